"""``InferenceModel``: a loaded model with its tokenizer, full-forward logits and generation.

    m = load_model("runs/tiny/checkpoint", overrides={"attention.variant": "dca", ...})
    m.logits(tokens)                       # LongTensor [B, S] -> float [B, S, vocab]
    m.logits(tokens, doc_ids=doc_ids)      # packed documents: no token attends across one
    m.generate(["Once upon a time"], max_new_tokens=32, temperature=0.8, top_p=0.9)
    m.tokenizer                            # a `tokenizers.Tokenizer`

``logits`` is one full forward pass (``gpt_forward``; for LongHeads, the uncached walk with the
whole-sequence LongHeads op). ``generate`` runs chunked prefill and cached decode; ``session``
exposes the cached step itself (used by the exactness tests and the benchmark).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence

import torch

from megatron_ext.config import RunConfig
from megatron_ext.inference.cp_prefill import cp_logits
from megatron_ext.inference.documents import check_doc_ids
from megatron_ext.inference.forward import CachedModel
from megatron_ext.inference.generation import GenerationStats, Session, generate_tokens
from megatron_ext.inference.sampling import SamplingParams
from megatron_ext.layers.forward import gpt_forward
from megatron_ext.ops.documents import document_runs

__all__ = ["InferenceModel", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class InferenceModel:
    """A GPTModel ready for inference (eval mode, one process).

    A model built context parallel (``cp`` > 1) prefills each prompt sharded over its CP
    group and keeps the whole cache on every rank (``cp_prefill.py``); every rank of the group
    then calls ``generate`` / ``logits`` with the same arguments and gets the same result.

    Args:
        model: a GPTModel from ``build_gpt_model`` with tp = 1 (any cp).
        config: the run config it was built from (after overrides); ``parallel.cp_layout``
            splits prompts under context parallelism.
        tokenizer: a ``tokenizers.Tokenizer`` or None (then prompts must be token ids).
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, tokenizer=None) -> None:
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        att = config.attention
        self.cached = CachedModel(model, att.variant, att.longheads,
                                  cp_layout=config.parallel.cp_layout)
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.cached.device

    def _check_length(self, total: int, what: str) -> None:
        limit = self.config.inference.max_seq_len
        if total > limit:
            raise ValueError(f"{what} = {total} tokens exceeds inference.max_seq_len={limit}; "
                             "shorten the prompt or raise the limit with "
                             f"--set inference.max_seq_len={total}")

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> None:
        vocab = self.model.vocab_size
        t = torch.as_tensor(ids)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"token ids span {int(t.min())}..{int(t.max())}; the model's "
                             f"vocabulary is 0..{vocab - 1} (vocab_size={vocab})")

    def _check_documents(self) -> None:
        if not self.config.attention.mask_documents:
            raise ValueError("doc_ids given but attention.mask_documents=False: this model "
                             "reads a row as one stream across documents; drop doc_ids or set "
                             "--set attention.mask_documents=true")

    def logits(self, tokens: torch.Tensor, *, seq_len: int | None = None,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One full forward pass: tokens [B, S] -> logits [B, S, vocab] (fp32 or model dtype).

        Args:
            seq_len: fixed length for length rules (dynamic NTK, DCA temperature); default what
                the batch shows.
            doc_ids: optional int [B, S] document ids of packed rows, non-decreasing along a
                row: positions restart at 0 in every document and no token attends across one
                (for LongHeads: chunk grid, chunk 0 and plain rows per document).
        """
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens shape={tuple(tokens.shape)} dtype={tokens.dtype}; "
                             "expected an int tensor [B, S]")
        self._check_length(tokens.shape[1], "sequence length")
        self._check_ids(tokens)
        positions = None
        if doc_ids is not None:
            self._check_documents()
            doc_ids = check_doc_ids(doc_ids, tuple(tokens.shape))
            positions = document_runs(doc_ids)[1].to(self.device)
            doc_ids = doc_ids.to(self.device)
        tokens = tokens.to(self.device)
        with torch.no_grad():
            if self.config.attention.variant == "longheads":
                return self.cached.longheads_logits(tokens, doc_ids)
            if self.cached.cp_group is not None:
                if doc_ids is not None:
                    raise ValueError(
                        "doc_ids with a context-parallel model is not supported; load the model "
                        "with context_parallel=1 for packed documents"
                    )
                return cp_logits(self.cached, tokens, seq_len)
            return gpt_forward(self.model, tokens, positions=positions, doc_ids=doc_ids,
                               seq_len=seq_len)

    def session(self, lengths: Sequence[int], rope_len: int | None = None) -> Session:
        """Empty caches for rows of the given planned total lengths (see ``Session``)."""
        return Session(self.cached, lengths, rope_len)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as token-id lists")
        return self.tokenizer.encode(text).ids

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] | None = None,
        prefill_chunk_size: int | None = None,
        seed: int | None = None,
        progress: bool = False,
        doc_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[str] | list[list[int]]:
        """Continue each prompt; None arguments take the run config's ``inference`` section.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists (any lengths).
            max_new_tokens: tokens to generate per prompt.
            temperature, top_k, top_p: sampling (temperature 0 = greedy).
            stop_tokens: ids that end a row; default the tokenizer's end-of-text token.
            prefill_chunk_size: prompt tokens per prefill step (under context
                parallelism, split over the ranks).
            seed: seed of the sampling generator.
            progress: show a progress bar (prefill tokens/s) and print peak memory.
            doc_ids: packed documents inside token-id prompts: one id per prompt token,
                non-decreasing along a prompt; the new tokens continue its last document.

        Returns:
            the continuations: strings for string prompts, token-id lists for id prompts.
            ``last_stats`` holds the timings.
        """
        ic = self.config.inference
        as_text = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], str))
        if isinstance(prompts, str):
            prompts = [prompts]
        if doc_ids is not None:
            self._check_documents()
            if as_text:
                raise ValueError("doc_ids needs token-id prompts (one id per token); got text "
                                 "prompts")
        ids = [self.encode(p) for p in prompts] if as_text else [list(p) for p in prompts]
        n_new = ic.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
            raise ValueError(f"max_new_tokens={n_new!r}; expected an int >= 1")
        chunk = ic.prefill_chunk_size if prefill_chunk_size is None else prefill_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"prefill_chunk_size={chunk!r}; expected an int >= 1")
        for p in ids:
            self._check_length(len(p) + n_new, "prompt + max_new_tokens")
            self._check_ids(p)
        params = SamplingParams(
            temperature=ic.temperature if temperature is None else temperature,
            top_k=ic.top_k if top_k is None else top_k,
            top_p=ic.top_p if top_p is None else top_p,
        )  # fmt: skip
        if stop_tokens is None:
            stop_tokens = self._default_stops()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(ic.seed if seed is None else seed)
        self.last_stats = stats = GenerationStats()
        if progress:
            out = self._with_progress(ids, n_new, params, chunk, stop_tokens, gen, stats,
                                      doc_ids)
        else:
            out = generate_tokens(self.cached, ids, max_new_tokens=n_new, sampling=params,
                                  prefill_chunk_size=chunk, stop_tokens=stop_tokens,
                                  generator=gen, stats=stats, doc_ids=doc_ids)
        if as_text:
            return [self.tokenizer.decode(o) for o in out]
        return out

    def _default_stops(self) -> list[int]:
        if self.tokenizer is None:
            return []
        from megatron_ext.data.tokenizer import EOT_TOKEN

        eot = self.tokenizer.token_to_id(EOT_TOKEN)
        return [] if eot is None else [eot]

    def _with_progress(self, ids, n_new, params, chunk, stops, gen, stats,
                       doc_ids=None) -> list[list[int]]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        total = sum(len(p) for p in ids)
        columns = (TextColumn("prefill"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("prefill", total=total, rate="-")
            t0 = time.perf_counter()

            def advance(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f}")

            out = generate_tokens(self.cached, ids, max_new_tokens=n_new, sampling=params,
                                  prefill_chunk_size=chunk, stop_tokens=stops, generator=gen,
                                  on_prefill=advance, stats=stats, doc_ids=doc_ids)
        peak = peak_memory_bytes(self.device)
        print(f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tok_s:,.0f} tok/s; "
              f"decode {stats.new_tokens} tokens at {stats.decode_tok_s:,.1f} tok/s; "
              f"KV cache {stats.cache_bytes / 2**20:,.1f} MiB; peak memory "
              f"{peak / 2**20:,.0f} MiB")
        return out
