"""`sidecar.models`: the architecture registry and `load_module` (real torch, real checkpoint files)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from sidecar.errors import ResourceFailed
from sidecar.models import architectures, load_module, register_architecture
from tests.resident_ops_module import MLP, make_mlp


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[MLP, Path]:
    torch.manual_seed(0)
    model = MLP()
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_same_factory_twice_is_a_no_op_and_another_is_refused() -> None:
    first = register_architecture("test_mlp", make_mlp, example_shape=(1, 4))
    assert register_architecture("test_mlp", make_mlp, example_shape=(1, 4)) is first
    assert "test_mlp" in architectures()
    with pytest.raises(ValueError, match="already registered with another factory"):
        register_architecture("test_mlp", lambda: MLP())


def test_loaded_module_computes_what_the_original_does(checkpoint: tuple[MLP, Path]) -> None:
    model, path = checkpoint
    loaded = load_module("test_mlp", path)
    x = torch.rand(7, 4)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))


def test_half_cast_stays_within_tolerance(checkpoint: tuple[MLP, Path]) -> None:
    model, path = checkpoint
    half = load_module("test_mlp", path, "bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.rand(7, 4)
    torch.testing.assert_close(half(x.bfloat16()).float(), model(x), atol=0.05, rtol=0.05)


def test_warm_up_runs_one_forward_on_the_declared_shape(checkpoint: tuple[MLP, Path]) -> None:
    _, path = checkpoint
    seen: list[tuple[int, ...]] = []

    def factory() -> MLP:
        m = MLP()
        m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
        return m
    register_architecture("test_mlp_hooked", factory, example_shape=(2, 4))
    load_module("test_mlp_hooked", path)
    assert seen == [(2, 4)]
    load_module("test_mlp_hooked", path, warmup=False)
    assert seen == [(2, 4)]


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ResourceFailed) as e:
        load_module("test_mlp", tmp_path / "nope.pt")
    assert e.value.cause == "missing_checkpoint"
    assert e.value.got == str(tmp_path / "nope.pt")


def test_incompatible_state_dict_lists_keys_and_shapes(tmp_path: Path) -> None:
    state = MLP(hidden=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc2.bias"]
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ResourceFailed) as e:
        load_module("test_mlp", path)
    err = e.value
    assert err.cause == "incompatible_state_dict"
    assert err.missing_keys == ["fc2.bias"]
    assert err.unexpected_keys == ["extra.weight"]
    assert "fc1.weight: checkpoint [8, 4], model [16, 4]" in err.shape_mismatches
    assert "fc2.bias" in err.message and "extra.weight" in err.message


def test_unknown_architecture_names_close_ones(checkpoint: tuple[MLP, Path]) -> None:
    with pytest.raises(ResourceFailed) as e:
        load_module("test_mpl", checkpoint[1])
    assert e.value.cause == "unknown_architecture"
    assert "test_mlp" in e.value.close_names


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("pickled code ran",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"fc1.weight": _Evil()}, f)
    with pytest.raises(ResourceFailed) as e:
        load_module("test_mlp", path)
    assert e.value.cause == "unreadable_checkpoint"
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_file_that_is_no_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ResourceFailed) as e:
        load_module("test_mlp", path)
    assert e.value.cause == "unreadable_checkpoint"
