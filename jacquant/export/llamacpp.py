"""llama.cpp as a peer runtime, through llama-cpp-python: load a GGUF file, its own logits over token windows,
perplexity, generation with timings, PTQ (``llama_model_quantize``) and an importance matrix.

``llama_cpp`` is imported on first use (``pip install llama-cpp-python``; it builds llama.cpp from source).

Numbers llama.cpp computes differently from PyTorch: on the CPU its matmuls with Q4_0/Q4_1/Q8_0 weights
quantize the activations to Q8_0 (blocks of 32, int8 with one fp16 scale) and with k-quants (Q2_K, Q3_K) to
Q8_K (blocks of 256), then multiply integers; so its logits carry a relative error of about the activation
rounding (int8: ~0.4% per block, averaging down over a dot product) on top of the weights' exact values.
:func:`round_activations` reproduces that rounding in PyTorch (measured in ``tests/test_gguf_export.py``).

AMX: a llama.cpp built natively on a CPU with AMX (``AMX_INT8 = 1`` in its system info) repacks Q4_0/Q4_1/Q8_0
weights for AMX tiles; on this project's machines (virtualised Xeons) that path crashes (SIGSEGV on the first
eval, the shipped SmolLM2 file included). :func:`load` then turns llama.cpp's extra weight buffers off
(``use_extra_bufts``: AMX and the AVX2 repacking), unless ``JACQUANT_LLAMA_EXTRA_BUFTS=1``.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = "llama.cpp runs through llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp, a few minutes)"
FTYPES = ("Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")


def llama_cpp():
    """The ``llama_cpp`` module, or an ImportError with the install command."""
    try:
        import llama_cpp as mod
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return mod


def load(path: str, *, n_ctx: int = 512, threads: int = 2, logits_all: bool = False, n_batch: int = 512):
    """A ``llama_cpp.Llama`` over ``path`` (quiet). ``logits_all`` keeps every position's logits (for
    :func:`logits`); generation needs only the last."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    mod = llama_cpp()
    from llama_cpp import llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params
    extra = extra_buffers()

    def params():
        p = default()
        p.use_extra_bufts = extra
        return p

    llama_module.llama_cpp.llama_model_default_params = params  # Llama() builds its model params from this
    try:
        return mod.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                         n_ubatch=n_batch, logits_all=logits_all, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def extra_buffers() -> bool:
    """Whether llama.cpp may use its extra weight buffers (AMX, repacking): not where its build has AMX (see the
    module docstring), unless ``JACQUANT_LLAMA_EXTRA_BUFTS`` says so ("1" on, "0" off)."""
    env = os.environ.get("JACQUANT_LLAMA_EXTRA_BUFTS")
    if env is not None:
        return env == "1"
    info = llama_cpp().llama_print_system_info()
    return b"AMX_INT8 = 1" not in (info or b"")


def logits(llm, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] (fp32) for token ids [T], from an empty cache (``llm`` loaded with logits_all)."""
    if not getattr(llm, "_logits_all", False):
        raise ValueError("logits: load the model with logits_all=True")
    if len(ids) > llm.n_ctx():
        raise ValueError(f"logits: {len(ids)} tokens exceed the context of {llm.n_ctx()}; load with a larger n_ctx")
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def window_logits(source: Union[str, object], windows: Tensor, threads: int = 2) -> Callable:
    """An iterator of (window index, logits [T, V]) over ``windows`` [n, T + 1] (inputs ``w[:-1]``)."""
    llm = load(source, n_ctx=max(64, windows.shape[1]), threads=threads, logits_all=True) \
        if isinstance(source, str) else source
    for i, w in enumerate(windows):
        yield i, logits(llm, w[:-1].tolist())


def perplexity(source: Union[str, object], windows: Tensor, threads: int = 2,
               reference: Optional[Callable[[int], Tensor]] = None) -> dict:
    """exp(mean next-token cross entropy) over ``windows`` [n, T + 1] int, each window one prefill from an empty
    cache, scored by llama.cpp's own logits: the same windows and the same mean as
    :func:`jacquant.app.lm_track.perplexity`. ``reference(i)``: the fp model's log-probabilities [T, V] of
    window i, for the mean KL(p_ref ‖ p_llama.cpp) per token. Returns ``{"ppl", "kl"}`` (kl None without one)."""
    total, kl, n = 0.0, 0.0, 0
    for i, lg in window_logits(source, windows, threads):
        lp = torch.log_softmax(torch.from_numpy(lg).double(), -1)
        target = windows[i, 1:].long()
        total += float(-lp.gather(1, target[:, None]).mean())
        if reference is not None:
            ref = reference(i).double()
            kl += float((ref.exp() * (ref - lp)).sum(-1).mean())
        n += 1
    return {"ppl": math.exp(total / n), "kl": kl / n if reference is not None else None}


# ----------------------------------------------------------------------------- llama.cpp's activation rounding
VEC_DOT = {"q4_0": "q8_0", "q8_0": "q8_0", "q4_1": "q8_1", "q2_k": "q8_k", "q3_k": "q8_k"}  # ggml-cpu's vec_dot_type


def round_activations(x: Tensor, kind: str) -> Tensor:
    """x [..., K] as llama.cpp's CPU matmul sees it after quantizing it for the weight's dot product:

        q8_0, q8_1  per 32: q = round(x·127/max|x|), x̂ = fp16(max|x|/127)·q  (Q4_0, Q8_0 / Q4_1 weights)
        q8_k        per 256: d = -max/127 with max the entry of largest |x|, q = clamp(round(x/d), -128, 127),
                    x̂ = d·q                                                   (Q2_K, Q3_K weights)

    (round half to even, as llama.cpp's AVX2 kernels and its nearest_int do)."""
    block = 256 if kind == "q8_k" else 32
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"round_activations: K={k} is not a multiple of {kind}'s block of {block}")
    xb = x.float().reshape(*x.shape[:-1], k // block, block)
    if kind == "q8_k":
        idx = xb.abs().argmax(-1, keepdim=True)
        top = xb.gather(-1, idx)
        inv = torch.where(top == 0, torch.zeros_like(top), -127.0 / top)
        q = (xb * inv).round().clamp(-128, 127)
        out = q * torch.where(inv == 0, torch.zeros_like(inv), 1.0 / inv)
    else:
        top = xb.abs().amax(-1, keepdim=True)
        inv = torch.where(top == 0, torch.zeros_like(top), 127.0 / top)  # ggml: id = 127/max, d = max/127
        out = (xb * inv).round() * (top / 127).half().float()
    return out.reshape(x.shape).to(x.dtype)


class LlamaCppActivations:
    """Context manager: every linear layer named in ``kinds`` ({module path: "q8_0" | "q8_1" | "q8_k"}) rounds its
    input as llama.cpp does (:func:`round_activations`), so a PyTorch forward reproduces llama.cpp's arithmetic up
    to summation order and its f16 KV cache. :func:`activation_kinds` gives ``kinds`` for a jacquant model."""

    def __init__(self, model: torch.nn.Module, kinds: dict[str, str]):
        self.model, self.kinds, self.hooks = model, kinds, []

    def __enter__(self):
        for path, kind in self.kinds.items():
            m = self.model.get_submodule(path)
            self.hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kind=kind: (round_activations(args[0], kind), *args[1:])))
        return self.model

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def activation_kinds(model: torch.nn.Module, head: Optional[str] = None) -> dict[str, str]:
    """{module path: activation rounding} for every GGUF-format site of a transformed model (and the LM head when
    ``head`` is a quantized type such as ``"q8_0"``)."""
    from jacquant.qat.quantizer import sites

    kinds = {}
    for s in sites(model):
        if s.quantizer.format:
            path = next(n for n, m in model.named_modules() if m is s.owner)
            kinds[path] = VEC_DOT[s.quantizer.format]
    if head in VEC_DOT:
        kinds["lm_head"] = VEC_DOT[head]
    return kinds


# ----------------------------------------------------------------------------- generation
def generate(path: str, prompt: Union[str, list[int]], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             stream: Union[bool, Callable[[str], None]] = False, threads: int = 2, stop_at_eos: bool = True,
             n_ctx: int = 2048, llm=None):
    """Generate with llama.cpp, timed like :func:`jacquant.export.generate` (same :class:`Generation`):
    ``prefill_seconds`` the prompt's run, ``decode_tokens_per_second`` one-token runs per second. Greedy at
    ``temperature`` 0, else sampled from llama.cpp's last logits by :func:`jacquant.export.generation.next_token`.
    ``chat`` applies the file's chat template (``tokenizer.chat_template``) to one user turn."""
    from jacquant.export.generation import Generation, next_token

    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1")
    llm = llm or load(path, n_ctx=n_ctx, threads=threads)
    if isinstance(prompt, str):
        text = _chat(llm, prompt) if chat else prompt
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=chat)
    else:
        ids = list(prompt)
    if not ids:
        raise ValueError("generate: the prompt has no tokens")
    if len(ids) + max_new_tokens > llm.n_ctx():
        raise ValueError(f"generate: {len(ids)} prompt + {max_new_tokens} new tokens exceed the context {llm.n_ctx()}")
    emit = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream is True else (stream or None)
    rng = np.random.default_rng(seed)
    eos = {llm.token_eos()} if stop_at_eos else set()
    mod = llama_cpp()
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(mod.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    out: list[int] = []
    raw = b""
    shown = ""
    decode, runs = 0.0, 0
    stopped = "max_new_tokens"
    token = next_token(last_logits(), rng, temperature, top_k, top_p)
    while True:
        if token in eos:
            stopped = "eos"
            break
        out.append(token)
        if emit is not None:
            raw = llm.detokenize(out)
            text = raw.decode("utf-8", errors="replace")
            if not text.endswith("\ufffd"):
                emit(text[len(shown):])
                shown = text
        if len(out) >= max_new_tokens:
            break
        t = time.perf_counter()
        llm.eval([token])
        decode += time.perf_counter() - t
        runs += 1
        token = next_token(last_logits(), rng, temperature, top_k, top_p)
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    if emit is not None and len(text) > len(shown):
        emit(text[len(shown):])
    return Generation(text=text, token_ids=out, prompt_tokens=len(ids), prefill_seconds=prefill, decode_seconds=decode,
                      decode_tokens_per_second=runs / decode if decode > 0 else 0.0, stopped_by=stopped)


def _chat(llm, prompt: str) -> str:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("generate(chat=True): the GGUF file has no tokenizer.chat_template")
    from jinja2 import Template

    return Template(template).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     bos_token="", eos_token="")


def speed(path: str, prompt_ids: Sequence[int], new_tokens: int = 64, threads: int = 2, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s of llama.cpp on ``path``: the best of ``repeats`` runs of a prefill of
    ``prompt_ids`` and ``new_tokens`` greedy one-token steps (EOS ignored)."""
    llm = load(path, n_ctx=len(prompt_ids) + new_tokens + 8, threads=threads)
    best_p, best_d = 0.0, 0.0
    for _ in range(repeats):
        g = generate(path, list(prompt_ids), new_tokens, stop_at_eos=False, llm=llm)
        best_p = max(best_p, g.prompt_tokens / g.prefill_seconds)
        best_d = max(best_d, g.decode_tokens_per_second)
    return {"prefill_tokens_per_s": best_p, "decode_tokens_per_s": best_d}


# ----------------------------------------------------------------------------- PTQ and the importance matrix
def quantize(src: str, dst: str, ftype: str, imatrix: Optional[dict[str, np.ndarray]] = None,
             threads: int = 2) -> dict:
    """llama.cpp's own post-training quantization of ``src`` into ``dst`` (``llama_model_quantize``, re-quantizing
    quantized tensors: ``allow_requantize``). ``ftype``: one of :data:`FTYPES` (llama.cpp chooses per tensor,
    e.g. Q4_0 for rows that k-quants cannot hold). ``imatrix``: {tensor name: mean squared input activation
    per column} (:func:`importance_matrix`, or :func:`read_imatrix` of a llama-imatrix file).
    Written to a temporary name and renamed. Returns ``{"path", "mib"}``."""
    mod = llama_cpp()
    if ftype not in FTYPES:
        raise ValueError(f"quantize: ftype {ftype!r} is not one of {FTYPES}")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"quantize: {src!r} does not exist")
    params = mod.llama_model_quantize_default_params()
    params.ftype = getattr(mod, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        entries = (mod.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(mod.llama_model_imatrix_data))
    tmp = dst + ".partial"
    rc = mod.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with code {rc}")
    os.replace(tmp, dst)
    return {"path": dst, "mib": os.path.getsize(dst) / 2 ** 20}


@torch.no_grad()
def importance_matrix(model: torch.nn.Module, windows: Tensor, batch: int = 4) -> dict[str, np.ndarray]:
    """llama-imatrix's statistic from PyTorch: for every linear layer of a Hugging Face Llama, the mean over
    the tokens of ``windows`` [n, T] of its input's squared entries, x_j², per input column j, keyed by
    llama.cpp's tensor name (``blk.3.ffn_down.weight``). llama-imatrix sums the same over the tokens that
    llama.cpp runs (``in_sum2 / counts``); ``llama_model_quantize`` weighs each column's rounding error by it."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, Tensor] = {}
    count = [0]
    hooks = []
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            gg = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
            if gg is None or gg.startswith("output"):
                continue

            def hook(mod, args, out, key=gg):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
            hooks.append(m.register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch]
            model(input_ids=x, use_cache=False)
            count[0] += x.numel()
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / count[0]).float().numpy() for k, v in sums.items()}


def write_imatrix(imatrix: dict[str, np.ndarray], tokens: int, path: str, chunk: int = 512) -> None:
    """Save an importance matrix in llama-imatrix's GGUF layout (``<tensor>.in_sum2`` = mean·tokens,
    ``<tensor>.counts`` = tokens), which llama.cpp's llama-quantize reads with ``--imatrix``."""
    import gguf

    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_uint32("imatrix.chunk_count", max(1, tokens // chunk))
    w.add_uint32("imatrix.chunk_size", chunk)
    w.add_array("imatrix.datasets", ["jacquant"])
    for name, mean in imatrix.items():
        w.add_tensor(f"{name}.in_sum2", (np.asarray(mean, np.float32) * tokens).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.full((1, 1), tokens, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str) -> dict[str, np.ndarray]:
    """{tensor: in_sum2 / counts} from a llama-imatrix GGUF file (what llama-quantize passes on)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    t = {x.name: np.asarray(x.data, np.float32).reshape(-1) for x in r.tensors}
    out = {}
    for name, sums in t.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = t[base + ".counts"]
            out[base] = (sums.reshape(len(counts), -1) / np.where(counts > 0, counts, 1)[:, None]).reshape(-1)
    return out
