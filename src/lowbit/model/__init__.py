"""Model plumbing: loading sources, applying a recipe to modules, reading and writing checkpoints."""
