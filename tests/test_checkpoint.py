"""Distributed checkpoints (megatron_ext.checkpoint) and the CPU workarounds (cpu_compat).

- Round trips compare parameters with `torch.equal` and eval-mode logits exactly: a checkpoint
  stores the float bits, and the same tensor-parallel layout runs the same arithmetic, so there
  is no tolerance to earn. Across layouts (a TP=2 checkpoint loaded at TP=1) the parameters are
  still bit-exact; only the logits of the TP=1 model differ, by fp32 summation order (1e-5).
- Atomic save: a crash simulated inside megatron-core's save and at the final rename must leave
  no directory that `load_megatron_checkpoint` accepts, and an older checkpoint at the target
  must survive. Corrupt and mismatched checkpoints are rejected with messages asserted here.
- The CPU workarounds route exactly the two upstream calls they name, only without CUDA, and
  applying them twice changes nothing.

Single-process tests run in this process on a world of one gloo rank; the TP=2 -> TP=1 -> TP=2
round trip runs in one spawned world of 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
from utils import run_distributed

from megatron_ext import checkpoint as ckpt
from megatron_ext import cpu_compat
from megatron_ext.checkpoint import (
    CheckpointError,
    load_megatron_checkpoint,
    read_checkpoint_info,
    save_megatron_checkpoint,
)
from megatron_ext.config import config_from_dict, load_config
from megatron_ext.layers.forward import gpt_forward
from megatron_ext.specs import build_gpt_model

VOCAB, B, S = 64, 2, 12

# torch's distributed checkpoint warns about its own deprecated internals on every call
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Untied output layer, biases, SwiGLU, GQA and QK layernorm: every resharded layout.
_RUN = {
    "model": {
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "max_position_embeddings": 64,
        "tie_embeddings": False,
        "add_bias_linear": True,
    },
    "attention": {
        "variant": "hybrid",
        "qk_norm": "layernorm_pre_rope",
        "hybrid": {"preset": "cohere2", "nope_every": 2, "window": 4},
    },
}


def _config(**model: object):
    return config_from_dict({"model": {**_RUN["model"], **model}, "attention": _RUN["attention"]})


def _model(seed: int, tp: int = 1, **model: object) -> torch.nn.Module:
    cfg = _config(**model)
    torch.manual_seed(seed)
    return build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB, tp=tp).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        return gpt_forward(model, tokens, positions=pos)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_nothing_loadable(parent: Path) -> None:
    """Every directory left under `parent` is refused by the loader."""
    model = _model(3)
    for entry in parent.iterdir():
        with pytest.raises(CheckpointError):
            load_megatron_checkpoint(model, entry)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A one-rank gloo world with Megatron's parallel state at TP=1."""
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    ps.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A checkpoint of `_model(0)` and that model's parameters."""
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    model = _model(0)
    save_megatron_checkpoint(model, directory, config=_config())
    return directory, _params(model)


@pytest.fixture
def copy_of_saved(saved: tuple[Path, dict], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


# ---------------------------------------------------------------- round trips, one process


def test_round_trip_is_bit_exact(world, tmp_path: Path) -> None:
    a = _model(0)
    path = save_megatron_checkpoint(a, tmp_path / "ckpt", config=_config())
    b = _model(1)
    assert not torch.equal(_logits(a), _logits(b))
    info = load_megatron_checkpoint(b, path)
    _assert_same(_params(b), _params(a))
    assert torch.equal(_logits(b), _logits(a))
    assert (info["tensor_parallel_size"], info["model"]["hidden_size"]) == (1, 32)
    assert load_config(path / ckpt.CONFIG_FILE) == _config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no leftovers


def test_save_replaces_an_existing_checkpoint(world, tmp_path: Path) -> None:
    save_megatron_checkpoint(_model(0), tmp_path / "ckpt")
    b = _model(1)
    save_megatron_checkpoint(b, tmp_path / "ckpt")
    c = _model(2)
    load_megatron_checkpoint(c, tmp_path / "ckpt")
    _assert_same(_params(c), _params(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------- atomic save


def _failing_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("simulated crash while moving the checkpoint into place")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)


def test_crash_at_rename_leaves_nothing_loadable(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _failing_rename(patch)
        with pytest.raises(OSError, match="simulated crash"):
            save_megatron_checkpoint(_model(0), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="ckpt does not exist"):
        load_megatron_checkpoint(_model(1), tmp_path / "ckpt")
    _assert_nothing_loadable(tmp_path)


def test_crash_at_rename_keeps_the_older_checkpoint(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _model(0)
    save_megatron_checkpoint(a, tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        _failing_rename(patch)
        with pytest.raises(OSError, match="simulated crash"):
            save_megatron_checkpoint(_model(1), tmp_path / "ckpt")
    c = _model(2)
    load_megatron_checkpoint(c, tmp_path / "ckpt")
    _assert_same(_params(c), _params(a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_crash_inside_megatron_save_leaves_nothing_loadable(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(state_dict, directory, *args, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"half")
        raise RuntimeError("simulated crash while writing shards")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.dist_checkpointing, "save", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_megatron_checkpoint(_model(0), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    _assert_nothing_loadable(tmp_path)


def test_directory_without_marker_is_refused(world, tmp_path: Path) -> None:
    # complete megatron-core files but no marker: what a save killed before the marker leaves
    model = _model(0)
    (tmp_path / "raw").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "raw"))
    with pytest.raises(CheckpointError, match="has no megatron_ext.json: not a complete"):
        load_megatron_checkpoint(model, tmp_path / "raw")


@pytest.mark.parametrize(
    ("leftover", "message"),
    [
        pytest.param(None, r"ckpt does not exist$", id="nothing"),
        pytest.param(
            ".ckpt.partial",
            r"does not exist \(\.ckpt\.partial exists: a save that did not",
            id="partial",
        ),
        pytest.param(
            ".ckpt.old", r"does not exist \(\.ckpt\.old exists: the previous checkpoint", id="old"
        ),
    ],
)
def test_missing_directory_names_leftovers(
    world, tmp_path: Path, leftover: str | None, message: str
) -> None:
    if leftover is not None:
        (tmp_path / leftover).mkdir()
    with pytest.raises(CheckpointError, match=message):
        load_megatron_checkpoint(_model(0), tmp_path / "ckpt")


# ---------------------------------------------------------------- corrupt and mismatched


def _truncate_shard(path: Path) -> str:
    shard = sorted(path.glob("*.distcp"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    return rf"{shard.name} has {size // 2} bytes, expected {size}"


def _delete_metadata(path: Path) -> str:
    (path / ".metadata").unlink()
    return r"corrupt: \.metadata is missing"


def _garble_marker(path: Path) -> str:
    (path / ckpt.MARKER).write_text('{"format": "megatron_ext.dist', encoding="utf-8")
    return r"megatron_ext.json is corrupt \(not valid JSON"


def _future_version(path: Path) -> str:
    marker = json.loads((path / ckpt.MARKER).read_text(encoding="utf-8"))
    marker["version"] = 99
    (path / ckpt.MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return "format version 99; this megatron_ext reads version 1"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_truncate_shard, id="truncated-shard"),
        pytest.param(_delete_metadata, id="missing-metadata"),
        pytest.param(_garble_marker, id="marker-not-json"),
        pytest.param(_future_version, id="marker-version"),
    ],
)
def test_corrupt_checkpoint_is_refused_before_loading(copy_of_saved: Path, damage) -> None:
    message = damage(copy_of_saved)
    model = _model(1)
    before = _params(model)
    with pytest.raises(CheckpointError, match=message):
        load_megatron_checkpoint(model, copy_of_saved)
    _assert_same(_params(model), before)  # found from the marker: the model is untouched


def test_unreadable_contents_are_reported(copy_of_saved: Path) -> None:
    # contents damaged without changing sizes: megatron-core's reader fails, the error names
    # the checkpoint (the model may be partly overwritten, as documented)
    meta = copy_of_saved / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    with pytest.raises(CheckpointError, match=r"ckpt could not be read: CheckpointException"):
        load_megatron_checkpoint(_model(1), copy_of_saved)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            {"hidden_size": 16},
            [
                "hidden_size: checkpoint 32, model 16",
                "embedding.word_embeddings.weight: checkpoint shape (64, 32), model (64, 16)",
            ],
            id="hidden-size",
        ),
        pytest.param(
            {"num_layers": 3},
            [
                "num_layers: checkpoint 2, model 3",
                "linear_fc2.weight: checkpoint shape (2, 32, 128), model (3, 32, 128)",
            ],
            id="num-layers",
        ),
        pytest.param(
            {"tie_embeddings": True},
            [
                "in the checkpoint but not in the model: output_layer.weight",
                "share_embeddings_and_output_weights: checkpoint False, model True",
            ],
            id="tied-embeddings",
        ),
        pytest.param(
            {"num_query_groups": 4},
            [
                "num_query_groups: checkpoint 2, model 4",
                "linear_qkv.weight: checkpoint shape (2, 64, 32), model (2, 96, 32)",
            ],
            id="query-groups",
        ),
    ],
)
def test_mismatched_model_names_what_differs(
    saved: tuple[Path, dict], change: dict, expected: list[str]
) -> None:
    with pytest.raises(CheckpointError, match="does not fit the model") as err:
        load_megatron_checkpoint(_model(1, **change), saved[0])
    for text in expected:
        assert text in str(err.value)


def test_attention_settings_may_change(saved: tuple[Path, dict]) -> None:
    # same tensors, different attention (e.g. DCA on a RoPE checkpoint): loads
    cfg = config_from_dict(
        {
            "model": _RUN["model"],
            "attention": {
                "variant": "dca",
                "qk_norm": "layernorm_pre_rope",
                "dca": {"chunk_size": 8, "local_size": 2},
            },
        }
    )
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB)
    info = load_megatron_checkpoint(model, saved[0])
    assert info["model"]["attention_variant"] == "hybrid"
    _assert_same(_params(model), saved[1])


def test_bad_arguments(world, saved: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no sharded_state_dict"):
        save_megatron_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="config of type list; expected a RunConfig"):
        save_megatron_checkpoint(_model(0), tmp_path / "x", config=[1])
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a megatron_ext checkpoint; refusing"):
        save_megatron_checkpoint(_model(0), precious)
    assert (precious / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # refused before writing
    with pytest.raises(ValueError, match="directory=3; expected a path"):
        load_megatron_checkpoint(_model(0), 3)


def test_marker_lists_every_file_but_itself(saved: tuple[Path, dict]) -> None:
    info = read_checkpoint_info(saved[0])
    on_disk = {p.name for p in saved[0].iterdir()}
    assert set(info["files"]) == on_disk - {ckpt.MARKER}
    assert {ckpt.CONFIG_FILE, ".metadata", "common.pt"} <= set(info["files"])
    assert info["tensors"]["output_layer.weight"] == {
        "shape": [VOCAB, 32],
        "dtype": "torch.float32",
    }


# ---------------------------------------------------------------- CPU workarounds

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of cpu_compat")


@cpu_only
def test_workarounds_are_idempotent_and_name_their_upstream_call() -> None:
    names = cpu_compat.apply_cpu_workarounds()
    views = (filesystem_async.torch, state_dict_saver.torch)
    assert cpu_compat.apply_cpu_workarounds() == names
    assert (filesystem_async.torch, state_dict_saver.torch) == views  # not wrapped twice
    assert set(names) == {w.name for w in cpu_compat.WORKAROUNDS}
    calls = {w.upstream_call for w in cpu_compat.applied_cpu_workarounds()}
    assert calls == {
        "megatron/core/dist_checkpointing/strategies/filesystem_async.py "
        "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()",
        "megatron/core/dist_checkpointing/strategies/state_dict_saver.py "
        "save_state_dict_async_finalize: torch.cuda.current_device()",
    }


@cpu_only
def test_workarounds_are_not_applied_when_cuda_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_compat.remove_cpu_workarounds()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            assert cpu_compat.apply_cpu_workarounds() == ()
            assert filesystem_async.torch is torch and state_dict_saver.torch is torch
            assert cpu_compat.applied_cpu_workarounds() == ()
    finally:
        cpu_compat.apply_cpu_workarounds()
    assert state_dict_saver.torch is not torch  # back in place for the other tests


@cpu_only
def test_preload_workaround_routes_only_synchronize() -> None:
    bucket = ("file", "key", ([], [("item", torch.arange(3.0))]))
    cpu_compat.remove_cpu_workarounds()
    try:
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            filesystem_async.FileSystemWriterAsync.preload_tensors([bucket], True)
    finally:
        cpu_compat.apply_cpu_workarounds()
    [(_, _, (_, [(_, tensor)]))] = filesystem_async.FileSystemWriterAsync.preload_tensors(
        [bucket], True
    )
    assert torch.equal(tensor, torch.arange(3.0))
    assert filesystem_async.torch.cuda.is_available is torch.cuda.is_available  # rest is real
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        torch.cuda.synchronize()  # the process-wide torch.cuda is untouched


@cpu_only
def test_finalize_workaround_broadcasts_on_cpu(world) -> None:
    class Writer:
        def retrieve_write_results(self):
            return []

        def finish(self, metadata, results):
            self.finished = True

    class Wrapper:
        is_coordinator, coordinator_rank, group = True, 0, None

        def gather_object(self, obj):
            return [obj]

    cpu_compat.remove_cpu_workarounds()
    try:
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            state_dict_saver.save_state_dict_async_finalize(Writer(), object(), Wrapper())
    finally:
        cpu_compat.apply_cpu_workarounds()
    writer = Writer()
    state_dict_saver.save_state_dict_async_finalize(writer, object(), Wrapper())
    assert writer.finished
    assert state_dict_saver.torch.cuda.current_device() == torch.device("cpu")


# ---------------------------------------------------------------- TP=2 -> TP=1 -> TP=2


def _gather(shards: list[torch.Tensor], attrs: tuple[bool, int, int]) -> torch.Tensor:
    """Full tensor from TP shards by Megatron's partition attributes (split, dim, stride)."""
    split, dim, stride = attrs
    if not split:
        return shards[0]
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][i] for i in range(stride) for r in range(len(shards))], dim=dim)


def _round_trip_worker(rank: int, group: dist.ProcessGroup, out: str) -> None:
    warnings.filterwarnings("ignore")
    first, second = Path(out) / "tp2", Path(out) / "tp1"
    result: dict = {}

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    a = _model(0, tp=2)
    result["a"], result["a_logits"] = _params(a), _logits(a)
    result["attrs"] = {
        k: (
            bool(getattr(p, "tensor_model_parallel", False)),
            getattr(p, "partition_dim", -1),
            getattr(p, "partition_stride", 1),
        )
        for k, p in a.named_parameters()
    }
    save_megatron_checkpoint(a, first)
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(tensor_model_parallel_size=1)  # 2 data-parallel replicas
    b = _model(1)
    result["b_before"] = _params(b)
    result["info_tp2"] = load_megatron_checkpoint(b, first)
    result["b"], result["b_logits"] = _params(b), _logits(b)
    save_megatron_checkpoint(b, second)
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    c = _model(2, tp=2)
    result["info_tp1"] = load_megatron_checkpoint(c, second)
    result["c"], result["c_logits"] = _params(c), _logits(c)
    ps.destroy_model_parallel()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tp_round_trip(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("tp_round_trip")
    run_distributed(_round_trip_worker, 2, tmp, out=str(tmp))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
def test_tp2_checkpoint_loads_bit_exactly_at_tp1(tp_round_trip: list[dict]) -> None:
    r0, r1 = tp_round_trip
    assert r0["info_tp2"]["tensor_parallel_size"] == 2
    gathered = {k: _gather([r0["a"][k], r1["a"][k]], r0["attrs"][k]) for k in r0["a"]}
    assert any(not torch.equal(gathered[k], r0["b_before"][k]) for k in gathered)
    for r in (r0, r1):  # both data-parallel replicas
        _assert_same(r["b"], gathered)
    # TP=1 logits equal the gathered TP=2 logits up to fp32 summation order
    a_logits = torch.cat([r0["a_logits"], r1["a_logits"]], dim=-1)
    torch.testing.assert_close(r0["b_logits"], a_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_tp2_tp1_tp2_round_trip_is_bit_exact(tp_round_trip: list[dict]) -> None:
    for r in tp_round_trip:
        assert r["info_tp1"]["tensor_parallel_size"] == 1
        _assert_same(r["c"], r["a"])
        assert torch.equal(r["c_logits"], r["a_logits"])
