"""Huge pages for what an engine allocates at load: the mechanism, and the CPU sessions that use it."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtimes import huge_pages
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor


def _kernel_collapses() -> bool:
    """Transparent huge pages on offer, and MADV_COLLAPSE (Linux 6.1)."""
    version = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    return huge_pages.available() and version >= (6, 1)


collapsing = pytest.mark.skipif(not _kernel_collapses(),
                                reason="needs transparent huge pages and MADV_COLLAPSE (Linux 6.1 or later)")


def _huge_bytes_within(start: int, end: int) -> int:
    """AnonHugePages of this process's mappings that overlap [start, end)."""
    total, overlapping = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            low, high = (int(bound, 16) for bound in head.split("-"))
            overlapping = low < end and start < high
        elif head == "AnonHugePages:" and overlapping:
            total += int(line.split()[1]) * 1024
    return total


@collapsing
def test_memory_that_appeared_in_between_is_collapsed_with_its_contents():
    before = huge_pages.anonymous_ranges()
    block = np.arange(16 << 20, dtype=np.uint8)  # written: 4 KiB pages, populated
    assert huge_pages.collapse_new(before) >= 8 << 20
    start = block.ctypes.data
    assert _huge_bytes_within(start, start + block.nbytes) >= 8 << 20
    np.testing.assert_array_equal(block, np.arange(16 << 20, dtype=np.uint8))


def test_nothing_is_advised_where_the_kernel_offers_no_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "_THP_SETTING", setting)
    before = huge_pages.anonymous_ranges()
    block = np.ones(16 << 20, dtype=np.uint8)
    assert not huge_pages.available() and huge_pages.collapse_new(before) == 0 and block.all()


@collapsing
def test_a_cpu_session_collapses_its_weights_and_computes_the_same(tmp_path):
    rows, columns = 1024, 4096  # a 16 MB weight, which ONNX Runtime copies into its own memory at load
    weight = np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])],
        [onnx.numpy_helper.from_array(weight, "w")])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with_pages, without = OnnxRuntimePredictor(path), OnnxRuntimePredictor(path, huge_pages=False)
    assert with_pages.huge_page_bytes >= 8 << 20 and without.huge_page_bytes == 0
    feeds = {"x": np.random.default_rng(1).standard_normal((3, rows), dtype=np.float32)}
    np.testing.assert_array_equal(with_pages.forward(feeds)["y"], without.forward(feeds)["y"])
