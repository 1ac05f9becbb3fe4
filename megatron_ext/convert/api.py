"""HF <-> megatron_ext conversions: `hf_to_mcore`, `mcore_to_hf`, `load_hf_into`,
`hf_to_run_config`.

HF -> ours streams the HF shards tensor by tensor into a GPTModel built at tensor-parallel size 1
(memory: the model plus one tensor) and saves it with `megatron_ext.checkpoint` (atomic; the
checkpoint loads at any tensor-parallel size, Megatron reshards). The converted directory is a
normal checkpoint directory plus `hf/`: the source `config.json`, `generation_config.json`,
tokenizer files and `conversion.json` (family and pass-through fields), so an export after
continued pretraining writes the same HF config back.

Ours -> HF reads the checkpoint one layer at a time (`mcore_io.SliceReader`, any saved TP
size) and writes sharded safetensors while it goes (memory: one layer plus one shard).
Every tensor on either side must be used exactly once, else the conversion stops naming them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_ext.config import DataConfig, ParallelConfig, RunConfig, load_config
from megatron_ext.convert import keymap
from megatron_ext.convert.errors import ConversionError
from megatron_ext.convert.hf_config import (
    INTERLEAVED,
    HFSpec,
    choose_family,
    from_hf_config,
    to_hf_config,
)
from megatron_ext.convert.hf_io import HFReader, ShardWriter, copy_side_files, write_json
from megatron_ext.convert.progress import progress

__all__ = ["hf_to_mcore", "hf_to_run_config", "layout_of", "load_hf_into", "mcore_to_hf",
           "read_hf_spec"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_SUBDIR = "hf"
SIDE_FILES = ("generation_config.json",)


def read_hf_spec(hf_dir: str | os.PathLike) -> HFSpec:
    """Family, our sections and pass-through fields of an HF directory's config.json."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{Path(hf_dir)} has no config.json: not a Hugging Face model "
                              "directory")
    from megatron_ext.checkpoint import read_json

    return from_hf_config(read_json(path, ConversionError))


def hf_to_run_config(hf_dir: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
    """A RunConfig whose `model` / `attention` sections describe the HF model in `hf_dir`.

    The other sections come from `base` (default: defaults); `data.tokenizer` points at
    `hf_dir` when it holds tokenizer files. For `train.init_from` / `load_model` on an HF
    directory: build the model from this config and call `load_hf_into`.
    """
    spec = read_hf_spec(hf_dir)
    base = base or RunConfig()
    data = base.data
    if (Path(hf_dir) / "tokenizer.json").is_file():
        data = DataConfig(**{**vars(base.data),
                             "tokenizer": str(Path(hf_dir).absolute() / "tokenizer.json")})
    return RunConfig(model=spec.model, attention=spec.attention, parallel=base.parallel,
                     train=base.train, data=data, deepspeed=base.deepspeed,
                     inference=base.inference)


def layout_of(model_cfg, attn_cfg, family: str) -> keymap.Layout:
    """The key-map layout of our sections exported as / imported from `family`."""
    return keymap.Layout(
        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_attention_heads,
        num_groups=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        head_dim=model_cfg.head_dim, qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=attn_cfg.qk_norm == "layernorm_pre_rope",
        parallel_block=model_cfg.parallel_block,
        tie_embeddings=model_cfg.tie_embeddings, interleaved=family in INTERLEAVED,
        key_name="t_proj" if attn_cfg.variant == "coca" else "k_proj",
        mlp_name="feed_forward" if family == "llama4_text" else "mlp",
        rotary_dim=int(model_cfg.head_dim * attn_cfg.rotary_percent))


def _all_rules(lay: keymap.Layout) -> Iterator[tuple[str, tuple[str, ...], keymap.Rule]]:
    """(our name, HF names, rule) for every tensor, layer by layer, then the rest."""
    for i in range(lay.num_layers):
        for r in keymap.layer_rules(lay):
            yield (f"decoder.layers.{i}.{r.ours}", tuple(f"model.layers.{i}.{h}" for h in r.hf),
                   r)
    for r in keymap.global_rules(lay):
        yield r.ours, r.hf, r


@contextlib.contextmanager
def megatron_single_process() -> Iterator[None]:
    """A one-rank gloo group and Megatron parallel state, unless one already exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import init_distributed

    made_dist = not dist.is_initialized()
    if made_dist:
        init_distributed()
    made_ps = not ps.model_parallel_is_initialized()
    if made_ps:
        ps.initialize_model_parallel(1)
    try:
        yield
    finally:
        if made_ps:
            ps.destroy_model_parallel()
        if made_dist:
            dist.destroy_process_group()


def _build(model_cfg, attn_cfg, *, meta: bool = False):
    from megatron_ext.specs import build_gpt_model

    vocab = model_cfg.vocab_size
    if meta:
        with torch.device("meta"):
            return build_gpt_model(model_cfg, attn_cfg, vocab_size=vocab,
                                   perform_initialization=False)
    return build_gpt_model(model_cfg, attn_cfg, vocab_size=vocab, perform_initialization=False)


def _real_names(model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _check_cover(names: set[str], covered: set[str], side: str) -> None:
    missing = sorted(names - covered)
    if missing:
        raise ConversionError(f"{side} tensors with no conversion rule: {', '.join(missing)}")


def load_hf_into(model: torch.nn.Module, hf_dir: str | os.PathLike, *,
                 show_progress: bool = False) -> HFSpec:
    """Copy the weights of an HF directory into `model` (a GPTModel at tensor-parallel size 1
    built from `hf_to_run_config(hf_dir)`), streaming tensor by tensor.

    Returns:
        The HF spec (family, sections, pass-through fields).

    Raises:
        ConversionError: a tensor unmapped on either side, a shape mismatch, a corrupt file.
    """
    tp = getattr(getattr(model, "config", None), "tensor_model_parallel_size", 1)
    if tp != 1:
        raise ConversionError(f"load_hf_into needs a tensor-parallel size 1 model (got {tp}); "
                              "convert with hf_to_mcore and load the checkpoint, which reshards")
    spec = read_hf_spec(hf_dir)
    reader = HFReader(hf_dir)
    lay = layout_of(spec.model, spec.attention, spec.family)
    params = dict(model.state_dict(keep_vars=True))
    ours_names = _real_names(model)
    covered, used = set(), set()
    rules = list(_all_rules(lay))
    for ours, hf_names, rule in progress(rules, "HF -> megatron_ext", show_progress):
        tensors = [reader.get(n) for n in hf_names]
        used.update(hf_names)
        value = keymap.from_hf_layer(lay, rule, tensors, list(hf_names))
        if ours not in params:
            raise ConversionError(f"the model has no tensor {ours} (needed for "
                                  f"{', '.join(hf_names)}); it was not built from this config")
        target = params[ours]
        if tuple(target.shape) != tuple(value.shape):
            raise ConversionError(f"tensor {', '.join(hf_names)} -> {ours}: shape "
                                  f"{tuple(value.shape)}, model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        covered.add(ours)
    _check_cover(ours_names, covered, "megatron_ext")
    unused = sorted(set(reader.keys()) - used)
    if spec.model.tie_embeddings and "lm_head.weight" in unused:
        lm, emb = reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")
        if torch.equal(lm, emb):
            unused.remove("lm_head.weight")
    if unused:
        raise ConversionError(f"{Path(hf_dir)}: tensors no rule uses: {', '.join(unused)}")
    return spec


def _publish_dir(tmp: Path, dst: Path) -> None:
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            raise ConversionError(f"{dst} exists and is not empty; choose a new --dst")
    os.rename(tmp, dst)


def hf_to_mcore(src: str | os.PathLike, dst: str | os.PathLike, *, tp: int = 1,
                show_progress: bool = True) -> Path:
    """Convert an HF directory into a megatron_ext checkpoint directory.

    Args:
        src: HF model directory (config.json + safetensors or .bin).
        dst: new checkpoint directory (must not exist or be empty).
        tp: tensor-parallel size recorded in the run config (`parallel.tensor_parallel_size`);
            the weights are stored with global shapes and load at any size.
        show_progress: progress bar.

    Returns:
        The checkpoint directory.
    """
    from megatron_ext.checkpoint import save_megatron_checkpoint

    src, dst = Path(src), Path(dst).absolute()
    spec = read_hf_spec(src)
    base = RunConfig(model=spec.model, attention=spec.attention,
                     parallel=ParallelConfig(tensor_parallel_size=tp))
    tmp = dst.with_name(f".{dst.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = (str(dst / HF_SUBDIR / "tokenizer.json") if (src / "tokenizer.json").is_file()
                 else None)
    cfg = RunConfig(model=base.model, attention=base.attention, parallel=base.parallel,
                    data=DataConfig(tokenizer=tokenizer))
    with megatron_single_process():
        model = _build(spec.model, spec.attention)
        load_hf_into(model, src, show_progress=show_progress)
        save_megatron_checkpoint(model, tmp, config=cfg)
    side = tmp / HF_SUBDIR
    side.mkdir()
    copy_side_files(src, side, ("config.json", *SIDE_FILES))
    from megatron_ext.convert.hf_io import TOKENIZER_FILES

    copy_side_files(src, side, TOKENIZER_FILES)
    write_json(side / "conversion.json", {"family": spec.family, "extra": spec.extra})
    _publish_dir(tmp, dst)
    return dst


def _resolve_mcore(src: Path) -> tuple[Path, Path]:
    """(checkpoint dir, config.yaml) of a checkpoint dir or a run dir with `latest`."""
    from megatron_ext.checkpoint import CONFIG_FILE, MARKER

    if (src / "model" / MARKER).is_file():  # a training checkpoint step_N/
        src = src / "model"
    if (src / "latest").exists() and not (src / MARKER).exists():
        latest = src / "latest"
        name = latest.read_text().strip() if latest.is_file() else os.readlink(latest)
        ck = src / "checkpoints" / name if (src / "checkpoints" / name).is_dir() else src / name
        src = ck
    for cand in (src / CONFIG_FILE, src.parent / CONFIG_FILE, src.parent.parent / CONFIG_FILE):
        if cand.is_file():
            return src, cand
    raise ConversionError(f"{src}: no {CONFIG_FILE} beside the checkpoint or in the run "
                          "directory; the export needs the run config")


def mcore_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, family: str | None = None,
                dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3,
                show_progress: bool = True) -> Path:
    """Export a megatron_ext checkpoint (any TP size it was saved at) as an HF directory.

    Args:
        src: checkpoint directory (or a run directory with `latest`).
        dst: new HF directory.
        family: HF family to write ('llama', 'qwen2', 'smollm3', 'llama4_text', 'cohere2',
            or 'megatron_ext' = bundled modelling code); default: the source's family when the
            checkpoint came from HF, else the first family that expresses the model exactly.
        dtype: 'float32' / 'bfloat16' / 'float16'; default the HF source's, else float32.
        max_shard_bytes: safetensors shard size.

    Raises:
        ConversionError: a config the family cannot express (with the reason), a tensor
            unmapped on either side, a corrupt checkpoint (naming the file).
    """
    from megatron_ext.checkpoint import read_checkpoint_info

    src, dst = Path(src).absolute(), Path(dst).absolute()
    ck, cfg_file = _resolve_mcore(src)
    marker = read_checkpoint_info(ck)
    cfg = load_config(cfg_file)
    if cfg.model.vocab_size is None:  # a training run sized it from its tokenizer
        vocab = (marker.get("model") or {}).get("vocab_size")
        if not vocab:
            raise ConversionError(f"{ck}: neither the run config nor the checkpoint marker "
                                  "records the vocabulary size")
        cfg.model.vocab_size = int(vocab)
    side = ck / HF_SUBDIR
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tok is not None and tok.is_file():
        tok = tok.parent
    if not side.is_dir() and tok is not None and (tok / "conversion.json").is_file():
        side = tok  # a run continued from a converted HF model: its hf/ directory
    origin: dict[str, Any] = {}
    if (side / "conversion.json").is_file():
        origin = json.loads((side / "conversion.json").read_text(encoding="utf-8"))
    extra = dict(origin.get("extra", {}))
    if family is None and origin.get("family"):
        fam = origin["family"]
        try:
            family = choose_family(cfg.model, cfg.attention, fam)
        except ConversionError:
            family = None
    family = choose_family(cfg.model, cfg.attention, family)
    torch_dtype = _DTYPES[dtype or str(extra.get("dtype") or "float32").replace("torch.", "")]
    from megatron_ext.convert.mcore_io import SliceReader, tensor_slices

    reader = SliceReader(ck)
    with megatron_single_process():
        meta = _build(cfg.model, cfg.attention, meta=True)
        slices = tensor_slices(meta)
    names = {k for k in slices if not k.endswith("_extra_state")}
    stored = {p.key for k in names for p in slices[k]}
    extra_keys = sorted(set(reader.tensors) - stored)
    if extra_keys:
        raise ConversionError(f"{ck}: stored tensors the config does not use: "
                              f"{', '.join(extra_keys)}")
    return export_tensors(cfg, lambda name: reader.read(name, slices[name]), names, dst,
                          family=family, extra=extra, dtype=torch_dtype, side=side,
                          max_shard_bytes=max_shard_bytes, show_progress=show_progress)


def export_tensors(cfg: RunConfig, get, names: set[str], dst: Path, *, family: str,
                   extra: dict[str, Any], dtype: torch.dtype, side: Path | None = None,
                   max_shard_bytes: int = 2 * 1024**3, show_progress: bool = True) -> Path:
    """Write the HF directory `dst` from our tensors: `get(name)` returns the state-dict
    tensor `name` (global shape), `names` are all tensor names of the source."""
    hf_cfg = to_hf_config(cfg.model, cfg.attention, family, extra)
    hf_cfg["dtype"] = str(dtype).replace("torch.", "")
    lay = layout_of(cfg.model, cfg.attention, family)
    tmp = dst.with_name(f".{dst.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        covered = set()
        for ours, hf_names, rule in progress(list(_all_rules(lay)), "megatron_ext -> HF",
                                             show_progress):
            if ours not in names:
                raise ConversionError(f"the source has no tensor {ours}")
            t = get(ours)
            for name, value in zip(hf_names, keymap.to_hf_layer(lay, rule, t), strict=True):
                writer.add(name, value.to(dtype))
            covered.add(ours)
        _check_cover(names, covered, "megatron_ext")
        writer.close()
        _write_hf_config(tmp, hf_cfg, family)
        _write_side_files(tmp, side or tmp / "none", cfg, extra)
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_hf_config(out: Path, hf_cfg: dict[str, Any], family: str) -> None:
    if family == "megatron_ext":
        from megatron_ext.convert.bundled import write_bundled_code

        write_bundled_code(out)
        write_json(out / "config.json", hf_cfg)
        return
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[family](**hf_cfg)
    data = config.to_dict()
    for key in ("dual_chunk_attention_config",):
        if key in hf_cfg:
            data[key] = hf_cfg[key]
    write_json(out / "config.json", data)


def _write_side_files(out: Path, side: Path, cfg: RunConfig, extra: dict[str, Any]) -> None:
    from megatron_ext.convert.hf_io import TOKENIZER_FILES

    if side.is_dir():
        copy_side_files(side, out, SIDE_FILES)
        copy_side_files(side, out, TOKENIZER_FILES)
    elif cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        tok = Path(cfg.data.tokenizer)
        if tok.is_dir():
            copy_side_files(tok, out, TOKENIZER_FILES)
        else:
            shutil.copyfile(tok, out / "tokenizer.json")
    if not (out / "generation_config.json").is_file():
        gen = {k: extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if extra.get(k) is not None}
        write_json(out / "generation_config.json", gen)
