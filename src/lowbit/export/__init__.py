"""Writers of files other engines load."""
