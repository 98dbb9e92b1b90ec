"""Generate text with a KV-cache decoder exported by ``jacquant.export_onnx(model, kv_cache=True)``.

One prefill run over the prompt fills the cache, then one run per new token feeds the cached keys and
values back (onnxruntime OrtValues, no copy through numpy). Next token: greedy ``argmax`` of the last
logits, or sampled from softmax(logits / temperature) restricted to the ``top_k`` most likely and the
smallest set whose probability reaches ``top_p``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from jacquant.export.decoder import META_FILE, load_metadata


@dataclass
class Generation:
    """The result of :func:`generate`: text and ids of the new tokens, and the timings.

    ``prefill_seconds``: the prompt's run (its logits included); ``decode_tokens_per_second``: one-token
    runs per second (each yields the next token's logits; 0 where there was none).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    stopped_by: str = "max_new_tokens"
    logits: list = field(default_factory=list)  # per new token, the logits [V] it was chosen from (keep_logits)


def session(path: Union[str, bytes], threads: Optional[int] = 2, options: Optional[dict] = None):
    """An onnxruntime CPU session for a decoder file or serialized model (``threads`` intra-op threads,
    spinning off so that shared cores are not burnt between runs unless ``options`` says otherwise)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, str(v))
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class Decoder:
    """A session over a KV-cache decoder plus its cache layout; :meth:`step` runs one chunk of tokens.

    ``source``: a decoder file, or an ``onnxruntime.InferenceSession``. The layout (layers, KV heads,
    head dim) comes from jacquant's ``jacquant.decoder`` metadata; for a decoder of the same interface
    exported elsewhere (onnxruntime-genai's builder), pass ``layout=(layers, kv_heads, head_dim)``.
    """

    def __init__(self, source, threads: Optional[int] = 2, options: Optional[dict] = None,
                 layout: Optional[tuple[int, int, int]] = None):
        import onnxruntime as ort

        if isinstance(source, ort.InferenceSession):
            self.session, self.folder = source, None
        else:
            path = os.fspath(source)
            self.session = session(path, threads, options)
            self.folder = os.path.dirname(os.path.abspath(path))
        if layout is not None:
            self.meta = dict(zip(("num_layers", "kv_heads", "head_dim"), layout))
        elif self.folder is not None:
            self.meta = load_metadata(path)
        else:
            meta = self.session.get_modelmeta().custom_metadata_map.get("jacquant.decoder")
            if meta is None:
                raise ValueError("the session is not a jacquant KV-cache decoder (no jacquant.decoder metadata); export "
                                 "it with jacquant.export_onnx(model, kv_cache=True), or pass layout=(layers, kv_heads, head_dim)")
            self.meta = json.loads(meta)
        self.layers, self.kv_heads, self.head_dim = self.meta["num_layers"], self.meta["kv_heads"], self.meta["head_dim"]
        self.past_names = [f"past_key_values.{i}.{n}" for i in range(self.layers) for n in ("key", "value")]
        self.present_names = [f"present.{i}.{n}" for i in range(self.layers) for n in ("key", "value")]
        self.takes_positions = "position_ids" in {i.name for i in self.session.get_inputs()}

    def empty_cache(self, batch: int) -> list:
        import onnxruntime as ort

        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(z) for _ in self.past_names]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: list) -> tuple[np.ndarray, list]:
        """Logits [B, S, V] of the chunk and the cache after it (OrtValues)."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        if self.takes_positions:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        for name, v in zip(self.past_names, cache):
            io.bind_ortvalue_input(name, v)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])


def _tokenizer(decoder: Decoder, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if decoder.folder is None:
        raise ValueError("generate: pass tokenizer= with a session (the tokenizer is found beside a decoder file)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(decoder.folder)
    except Exception as e:
        raise ValueError(f"generate: no tokenizer beside {decoder.folder} ({type(e).__name__}: {e}); export with "
                         "jacquant.export_onnx(..., kv_cache=True, tokenizer=tok) or pass tokenizer=") from None


def next_token(logits: np.ndarray, rng: Optional[np.random.Generator], temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0) -> int:
    """argmax of ``logits`` [V] when ``temperature`` is 0, else a sample of softmax(logits/T) over the
    top-k (k > 0) and top-p nucleus (the fewest most-likely tokens whose probability sum reaches p)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def generate(source: Union[str, os.PathLike, object], prompt: Union[str, list[int]], max_new_tokens: int = 64, *,
             tokenizer=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False, stream: Union[bool, Callable[[str], None]] = False, stop_at_eos: bool = True,
             threads: Optional[int] = 2, session_options: Optional[dict] = None,
             keep_logits: bool = False) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with an exported KV-cache decoder.

    ``source``: the decoder's ONNX path (its tokenizer is loaded from the same folder), an
    onnxruntime session over one, or a :class:`Decoder`. ``prompt``: text, or token ids. ``chat``
    wraps text in the tokenizer's chat template as one user turn. ``temperature`` 0 is greedy;
    otherwise tokens are sampled (:func:`next_token`, ``seed``). ``stream`` True prints the text as
    it grows; a callable receives each new piece. Stops at an end-of-sequence id of the export
    unless ``stop_at_eos`` is False. ``keep_logits`` keeps each step's last logits in the result.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1")
    dec = source if isinstance(source, Decoder) else Decoder(source, threads, session_options)
    tok = None
    if isinstance(prompt, str):
        tok = _tokenizer(dec, tokenizer)
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tok(prompt)["input_ids"]
    else:
        ids = list(prompt)
        tok = tokenizer if tokenizer is not None else (_maybe_tokenizer(dec))
    if not ids:
        raise ValueError("generate: the prompt has no tokens")
    emit = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream is True else (stream or None)
    rng = np.random.default_rng(seed)
    eos = set(dec.meta.get("eos_token_ids", [])) if stop_at_eos else set()
    n = len(ids)
    t0 = time.perf_counter()
    logits, cache = dec.step(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], dec.empty_cache(1))
    prefill = time.perf_counter() - t0
    out: list[int] = []
    shown = ""
    stopped = "max_new_tokens"
    decode, runs = 0.0, 0
    kept: list = []
    token = next_token(logits[0, -1], rng, temperature, top_k, top_p)
    if keep_logits:
        kept.append(logits[0, -1].copy())
    while True:
        if token in eos:
            stopped = "eos"
            break
        out.append(token)
        if emit is not None and tok is not None:
            text = tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
                emit(text[len(shown):])
                shown = text
        if len(out) >= max_new_tokens:
            break
        total = n + len(out)
        t = time.perf_counter()
        logits, cache = dec.step(np.array([[token]]), np.ones((1, total), np.int64), np.array([[total - 1]]), cache)
        decode += time.perf_counter() - t
        runs += 1
        token = next_token(logits[0, -1], rng, temperature, top_k, top_p)
        if keep_logits:
            kept.append(logits[0, -1].copy())
    text = tok.decode(out, skip_special_tokens=True) if tok is not None else ""
    if emit is not None and tok is not None and len(text) > len(shown):
        emit(text[len(shown):])
    return Generation(text=text, token_ids=out, prompt_tokens=n, prefill_seconds=prefill, decode_seconds=decode,
                      decode_tokens_per_second=runs / decode if decode > 0 else 0.0, stopped_by=stopped, logits=kept[:len(out)])


def _maybe_tokenizer(dec: Decoder):
    if dec.folder is None or not os.path.exists(os.path.join(dec.folder, "tokenizer_config.json")):
        return None
    return _tokenizer(dec, None)


__all__ = ["Decoder", "Generation", "generate", "next_token", "session", "META_FILE"]
