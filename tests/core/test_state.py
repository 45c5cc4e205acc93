"""TRAIN / FREEZE / PRUNE element state: invariants, in-place updates, persistence."""

from __future__ import annotations

import pytest
import torch

from dimred_dist.core.state import DimRedState, ElementState, ParamState


def _bool(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def _state(keep: list[int], train: list[int], name: str = "w", shape=(2, 3), start: int = 0) -> ParamState:
    return ParamState(name, shape, start, start + len(keep), _bool(*keep), _bool(*train))


def test_element_state_codes_are_stable():
    # the codes are saved in checkpoints and summed in agreement checksums
    assert (ElementState.TRAIN, ElementState.FREEZE, ElementState.PRUNE) == (0, 1, 2)


def test_dense_is_all_train():
    ps = ParamState.dense("w", (4, 5), 3, 11)
    assert ps.numel == 20 and ps.local_numel == 8
    assert ps.keep.all() and ps.train.all()
    assert ps.counts() == {ElementState.TRAIN: 8, ElementState.FREEZE: 0, ElementState.PRUNE: 0}


@pytest.mark.parametrize(
    "start, end, keep, train, match",
    [
        (-1, 2, 3, 3, "outside"),
        (4, 7, 3, 3, "outside"),  # end past numel 6
        (3, 2, 0, 0, "outside"),
        (0, 3, 2, 3, "keep must be a bool tensor of shape"),
        (0, 3, 3, 4, "train must be a bool tensor of shape"),
    ],
)
def test_invalid_ranges_and_masks_raise(start, end, keep, train, match):
    with pytest.raises(ValueError, match=match):
        ParamState("w", (2, 3), start, end, torch.ones(keep, dtype=torch.bool), torch.ones(train, dtype=torch.bool))


def test_non_bool_mask_raises():
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        ParamState("w", (2, 3), 0, 6, torch.ones(6, dtype=torch.uint8), torch.ones(6, dtype=torch.bool))


def test_codes_and_counts_hand_worked():
    ps = _state(keep=[1, 1, 0, 1, 0, 1], train=[1, 0, 0, 1, 0, 0])
    assert ps.codes().tolist() == [0, 1, 2, 0, 2, 1]
    assert ps.counts() == {ElementState.TRAIN: 2, ElementState.FREEZE: 2, ElementState.PRUNE: 2}
    assert ps.prune_mask().tolist() == [False, False, True, False, True, False]
    assert ps.freeze_mask().tolist() == [False, True, False, False, False, True]


def test_set_keep_is_in_place_and_keeps_train_inside_keep():
    ps = _state(keep=[1, 1, 0, 0, 1, 1], train=[1, 0, 0, 0, 1, 1])
    keep_ref, train_ref = ps.keep_bits, ps.train_bits
    ps.set_keep(_bool(1, 0, 1, 0, 1, 1))
    assert ps.keep_bits is keep_ref and ps.train_bits is train_ref  # the packed tensors keep their identity
    assert ps.keep.tolist() == [True, False, True, False, True, True]
    # 0: stays TRAIN, 1: FREEZE -> PRUNE, 2: regrown -> TRAIN, 4/5 unchanged
    assert ps.codes().tolist() == [0, 2, 0, 2, 0, 0]


def test_set_keep_can_grow_into_freeze():
    ps = _state(keep=[1, 0, 0], train=[1, 0, 0], shape=(3,))
    ps.set_keep(_bool(1, 1, 0), train_new=False)
    assert ps.codes().tolist() == [0, 1, 2]


def test_set_train_never_revives_pruned_entries():
    ps = _state(keep=[1, 1, 0, 0], train=[1, 1, 0, 0], shape=(4,))
    train_ref = ps.train_bits
    ps.set_train(_bool(0, 1, 1, 0))
    assert ps.train_bits is train_ref
    assert ps.codes().tolist() == [1, 0, 2, 2]


def test_set_keep_accepts_other_dtypes():
    ps = ParamState.dense("w", (4,), 0, 4)
    ps.set_keep(torch.tensor([1, 0, 2, 0]))
    assert ps.keep.dtype == torch.bool and ps.keep.tolist() == [True, False, True, False]


def _two_param_state() -> DimRedState:
    return DimRedState({"a": ParamState.dense("a", (2, 2), 0, 4), "b": ParamState.dense("b", (6,), 2, 5)})


def test_dimred_state_container():
    st = _two_param_state()
    assert len(st) == 2 and "a" in st and "c" not in st
    assert [ps.name for ps in st] == ["a", "b"]
    with pytest.raises(ValueError, match="already managed"):
        st.add(ParamState.dense("a", (2, 2), 0, 4))
    st.add(ParamState.dense("c", (1,), 0, 1))
    assert st["c"].numel == 1


def test_state_dict_round_trip_in_place():
    st = _two_param_state()
    st["a"].set_keep(_bool(1, 0, 1, 0))
    st["a"].set_train(_bool(1, 0, 0, 0))
    st["b"].set_keep(_bool(0, 1, 1))
    sd = st.state_dict()
    assert set(sd) == {f"{n}.{k}" for n in "ab" for k in ("keep", "train", "range", "shape")}
    assert sd["b.range"].tolist() == [2, 5] and sd["b.shape"].tolist() == [6]
    st["a"].set_keep(torch.ones(4, dtype=torch.bool))  # the saved tensors are copies
    assert sd["a.keep"].tolist() == [True, False, True, False]

    fresh = _two_param_state()
    refs = [(ps.keep_bits, ps.train_bits) for ps in fresh]
    fresh.load_state_dict(sd)
    assert all(k is ps.keep_bits and t is ps.train_bits for (k, t), ps in zip(refs, fresh))  # loaded in place
    assert fresh["a"].codes().tolist() == [0, 2, 1, 2]
    assert fresh["b"].codes().tolist() == [2, 0, 0]


def test_load_state_dict_sanitizes_train_outside_keep():
    st = _two_param_state()
    sd = st.state_dict()
    sd["a.keep"] = _bool(0, 1, 1, 1)  # train still all True in the saved dict
    st.load_state_dict(sd)
    assert st["a"].codes().tolist() == [2, 0, 0, 0]


def test_load_state_dict_rejects_mismatches():
    st = _two_param_state()
    sd = st.state_dict()
    with pytest.raises(KeyError, match="missing"):
        st.load_state_dict({k: v for k, v in sd.items() if k != "b.train"})
    with pytest.raises(KeyError, match="unexpected"):
        st.load_state_dict({**sd, "z.keep": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"b: saved shape \(6,\) range \(0, 3\)"):
        st.load_state_dict({**sd, "b.range": torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="saved shape"):
        st.load_state_dict({**sd, "a.shape": torch.tensor([4])})
