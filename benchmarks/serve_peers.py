"""The per-request apps fastbert serve is measured against (benchmarks/serve_load.py starts them).

  torch            a plain FastAPI app calling SentenceTransformer.encode per request: what users write by hand
  openvino         the same app with SentenceTransformer(backend="openvino") (needs optimum-intel)
  openvino-direct  the same app on OpenVINO directly (OpenVINOEncoder): needs only the openvino package

    python benchmarks/serve_peers.py MODEL_DIR --port 8000 --backend torch --threads 2
"""
from __future__ import annotations

import argparse
import sys
import threading

import numpy as np
from pydantic import BaseModel


class EmbedBody(BaseModel):
    inputs: str | list[str]


def st_server(model_dir: str, port: int, backend: str, threads: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    if backend == "openvino-direct":
        model = OpenVINOEncoder(model_dir, threads)
    else:
        model = SentenceTransformer(model_dir, device="cpu", backend=backend)
    app = FastAPI()

    # One encode at a time: OpenVINO's compiled model answered 500s and hung when FastAPI's thread pool
    # called it concurrently (seen in a smoke run), and for torch it keeps 2 threads from oversubscribing.
    lock = threading.Lock()

    @app.post("/embed")
    def embed(body: EmbedBody):  # a plain def: FastAPI runs it in its thread pool
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        with lock:
            values = model.encode(texts)
        return values.tolist()

    @app.get("/health")
    def health():
        return {}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class OpenVINOEncoder:
    """What SentenceTransformer(backend="openvino") runs, without optimum-intel: the transformers model exported
    with openvino.convert_model (fp32 IR, dynamic shapes), compiled for the CPU with `threads` inference threads
    (OpenVINO's default precision hint: bf16 on a CPU with native bf16, else fp32), then the request's texts
    padded to their longest, mean pooling over the mask and L2 normalization (all-MiniLM-L6-v2's pipeline).
    For where optimum-intel cannot be installed beside this transformers (docs/perf-notes.md, 2026-12-07)."""

    def __init__(self, model_dir: str, threads: int):
        import openvino as ov
        import torch
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModel.from_pretrained(model_dir).eval()
        example = dict(self.tokenizer(["warm up", "a second example text"], padding=True, return_tensors="pt"))
        with torch.no_grad():
            exported = ov.convert_model(model, example_input=example)
        self.compiled = ov.Core().compile_model(exported, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        print(f"openvino-direct: inference precision {self.precision}", file=sys.stderr, flush=True)

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np"))
        hidden = self.compiled(batch)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", default="torch", choices=("torch", "openvino", "openvino-direct"))
    parser.add_argument("--threads", type=int, required=True, help="torch / OpenVINO inference threads")
    args = parser.parse_args()
    st_server(args.model_dir, args.port, args.backend, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
