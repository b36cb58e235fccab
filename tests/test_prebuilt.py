"""The cubins shipped in toolchain/prebuilt/: one for every kernel build of the two real models, for the current
sources (a kernel change without `make prebuilt` fails here), equal to what nvcc makes of them, and used without
any compiler on the machine."""
from __future__ import annotations

import pytest

from toolchain import kernels as K
from toolchain.errors import UserError


def test_every_real_model_build_is_shipped():
    builds = K.real_model_builds()
    assert len(builds) > 40  # general + decode builds of both models
    missing = [(op, d) for op, d in builds if not K.prebuilt_path(op, d).is_file()]
    assert not missing, f"{len(missing)} builds have no prebuilt cubin for the current sources: run `make prebuilt`"


def test_shipped_set_has_nothing_stale():
    wanted = {K.prebuilt_path(op, d).name for op, d in K.real_model_builds()}
    assert {p.name for p in K.PREBUILT.glob("*.cubin")} == wanted


@pytest.mark.parametrize("op", ["argmax", "rms_norm_qkv"])
def test_prebuilt_equals_a_fresh_nvcc_build(op, tmp_path, monkeypatch):
    """Same nvcc release as recorded: a fresh build (empty cache) gives the shipped bytes."""
    nvcc = K.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    if K._nvcc_version(nvcc).splitlines()[-1] != (K.PREBUILT / "NVCC_VERSION").read_text().strip():
        pytest.skip("a different nvcc release than the one that built the shipped cubins")
    monkeypatch.setattr(K, "CACHE", tmp_path)
    op_, defines = next((o, d) for o, d in K.real_model_builds() if o == op)
    assert K.compile_kernel(op_, defines, "cubin", prebuilt=False) == K.prebuilt_path(op_, defines).read_bytes()


def test_no_compiler_needed_for_real_models_and_a_clear_error_otherwise(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "nvcc_path", lambda: None)
    monkeypatch.setattr(K, "CACHE", tmp_path)
    for op, d in K.real_model_builds():
        assert K.compile_kernel(op, d, "cubin")[:4] == b"\x7fELF"
    with pytest.raises(UserError, match="no prebuilt kernel .* nvcc was not found"):
        K.compile_kernel("rms_norm", {"RMS_EPS": 0.5}, "cubin")
    assert not list(tmp_path.iterdir())
