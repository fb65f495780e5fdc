"""The compiled core's cffi binding: present, and of the layout Python expects."""

import pytest

import dmb.segment

pytestmark = pytest.mark.timeout(30)


def test_binding_exports_ffi_and_lib():
    from dmb import _ring_cffi

    assert hasattr(_ring_cffi, "ffi")
    assert hasattr(_ring_cffi, "lib")
    for function in (
        "dmb_init",
        "dmb_attach",
        "dmb_send",
        "dmb_recv",
        "dmb_group_send",
        "dmb_stats",
    ):
        assert callable(getattr(_ring_cffi.lib, function)), function


def test_compiled_layout_version_matches_the_python_side():
    from dmb._ring_cffi import lib

    assert lib.DMB_LAYOUT_VERSION == dmb.segment.LAYOUT_VERSION


def test_binding_structs_have_the_sizes_the_header_declares():
    from dmb._ring_cffi import ffi, lib

    assert ffi.sizeof("struct dmb_wake") == 24
    assert ffi.sizeof("struct dmb_channel_info") >= lib.DMB_NAME_MAX
    assert lib.dmb_min_size() == dmb.segment.MIN_SIZE > 0
