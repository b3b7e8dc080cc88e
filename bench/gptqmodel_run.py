"""Time GPTQModel's GPTQ on the folder `bench/gptq_speed.py prepare` wrote (run with GPTQModel's own venv).

    GPTQMODEL_CPU_WORKERS=2 python bench/gptqmodel_run.py /tmp/gptq-speed [auto|fp32] [act-order]

``auto`` (default) lets GPTQModel pick its dtype (bf16 on CPU); ``fp32`` pins float32, the like-for-like
choice on CPUs without native bf16, where bf16 products are several times slower. ``act-order`` turns on
GPTQModel's desc_act (activation order).
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptqmodel import GPTQModel, QuantizeConfig

d = Path(sys.argv[1])
dtype = sys.argv[2] if len(sys.argv) > 2 else "auto"
act_order = len(sys.argv) > 3 and sys.argv[3] == "act-order"
extra = {"dtype": torch.float32} if dtype == "fp32" else {}
ids = load_file(str(d / "calibration.safetensors"))["input_ids"]
calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
model = GPTQModel.load(str(d / "model"), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=act_order),
                       device="cpu", **extra)
t0 = time.perf_counter()
model.quantize(calibration, batch_size=1)
seconds = time.perf_counter() - t0
order = "act-order" if act_order else "no act-order"
result = {"tool": f"GPTQModel {__import__('gptqmodel').__version__} ({dtype} dtype, {order})", "seconds": seconds,
          "samples": int(ids.shape[0]), "length": int(ids.shape[1])}
(d / f"gptqmodel-{dtype}-{'act' if act_order else 'plain'}.json").write_text(json.dumps(result, indent=2))
print(result)
