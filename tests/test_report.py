"""HTML report: rendered by headless Chromium, plots present as real PNGs, verdict and blame visible."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from anepack.cli import main
from anepack.errors import AnepackError
from anepack.report.html import render_report, write_report
from anepack.validate.history import RunStore
from anepack.validate.record import new_record, tensor_entry

KINDS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
RECIPE_TOML = 'name = "lut4-grouped"\ndescription = "4-bit palettization, one LUT per 16 output channels"\n'


def failing_gate_record() -> dict:
    """Four layers (layer 2 fails cumulatively), two prompts ('code' fails from position 5)."""
    record = new_record("gate")
    record["recipe"] = {"name": "lut4-grouped", "toml": RECIPE_TOML}
    isolated = [0.9991, 0.9984, 0.9902, 0.9978]
    cumulative = [0.9990, 0.9951, 0.9610, 0.9655]
    for index in range(4):
        blame = [{"tensor": f"blk.{index}.{kind}", "format": "lut4-g16", "bits_per_weight": 4.06,
                  "min_cosine": 0.999 - 0.002 * rank, "share": share}
                 for rank, (kind, share) in enumerate(zip(("ffn_down.weight", "attn_v.weight", "ffn_up.weight"),
                                                          (0.5, 0.3, 0.2)))]
        record["layers"].append({"layer": index, "isolated_min": isolated[index], "isolated_mean": isolated[index] + 5e-4,
                                 "cumulative_min": cumulative[index], "cumulative_mean": cumulative[index] + 5e-4,
                                 "passed": cumulative[index] >= 0.97, "blame": blame})
    prose = np.linspace(0.999, 0.985, 12)
    code = np.concatenate([np.linspace(0.998, 0.975, 5), np.linspace(0.95, 0.90, 5)])
    for name, cosines, top1 in (("prose", prose, 0.97), ("code", code, 0.80)):
        kl = (1 - cosines) * 3
        failing = np.flatnonzero(cosines < 0.97)
        record["prompts"].append({
            "name": name, "tokens": len(cosines), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
            "max_kl": float(kl.max()), "mean_kl": float(kl.mean()), "top1_agreement": top1,
            "first_failing_position": int(failing[0]) if failing.size else None, "passed": not failing.size,
            "cosine_per_position": cosines.tolist(), "kl_per_position": kl.tolist()})
    for index in range(4):
        for position, kind in enumerate(KINDS):
            record["tensors"].append(tensor_entry(f"blk.{index}.{kind}", "lut4-g16" if position % 3 else "int8-c",
                                                  4.06 if position % 3 else 8.02, 640 * 1024))
    record["tensors"].append(tensor_entry("output.weight", "lut6-g16", 6.1, 262144 * 640))
    record["bits"] = {"layers_average": 5.4, "lm_head": 6.1, "shipped_average": 5.9, "embedding_host": 16.0}
    record["timings"] = {"total_s": 12.3, "layers_s": 8.1}
    record["passed"] = False
    return record


class _Dom(HTMLParser):
    """The images (id -> src), the blame table's body rows and the verdict text of a page."""

    def __init__(self, page: str):
        super().__init__()
        self.images: dict[str, str] = {}
        self.blame_rows: list[list[str]] = []
        self.verdict = ""
        self._in_blame = self._in_body = False
        self._verdict_depth = 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images[attributes.get("id", "")] = attributes.get("src", "")
        if tag == "table":
            self._in_blame = attributes.get("id") == "blame-table"
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_blame and self._in_body:
            self.blame_rows.append([])
        if tag == "div" and (self._verdict_depth or attributes.get("id") == "verdict"):
            self._verdict_depth += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        if tag == "table":
            self._in_blame = False
        if tag == "div" and self._verdict_depth:
            self._verdict_depth -= 1

    def handle_data(self, data):
        if self._in_blame and self._in_body and self.blame_rows:
            self.blame_rows[-1].append(data)
        if self._verdict_depth:
            self.verdict += data


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package 'chromium' is not installed (.ci/run installs it)")
def test_report_from_the_cli_renders_in_chromium(tmp_path):
    record = failing_gate_record()
    db = tmp_path / "runs.sqlite"
    RunStore(db).add(record)
    page = tmp_path / "report.html"
    written = CliRunner().invoke(main, ["report", "latest", "--out", str(page), "--db", str(db), "--json"])
    assert written.exit_code == 0, written.output
    assert json.loads(written.stdout) == {"run": 1, "report": str(page), "passed": False}

    dumped = chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr
    dom = _Dom(dumped.stdout)
    for plot_id in ("plot-layer-cosine", "plot-position-cosine", "plot-bits-heatmap"):
        prefix = "data:image/png;base64,"
        assert dom.images[plot_id].startswith(prefix)
        png = base64.b64decode(dom.images[plot_id][len(prefix):], validate=True)
        width, height = png_size(png)
        assert len(png) > 10_000 and width >= 800 and height >= 300, (plot_id, len(png), width, height)
    assert dom.verdict.split()[0] == "FAILED"
    assert "layer 2: min hidden-state cosine 0.96100" in dom.verdict
    assert "prompt 'code'" in dom.verdict and "at position 5" in dom.verdict
    assert len(dom.blame_rows) == 12
    assert dom.blame_rows[0][:3] == ["0", "blk.0.ffn_down.weight", "lut4-g16"]
    assert dom.blame_rows[0][-1] == "50.0%"

    screenshot = tmp_path / "report.png"
    shot = chromium(tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1200,3000", page.as_uri())
    assert screenshot.exists(), shot.stderr
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.1
    distinct_colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(distinct_colours) > 200  # plots are antialiased in many colours; text alone has few


def test_report_without_layer_data_says_so_and_loads_nothing(tmp_path):
    record = new_record("golden")
    record["prompts"] = failing_gate_record()["prompts"]
    record["prompts"][0]["name"] = "<script>alert(1)</script>"
    record["passed"] = True
    page = render_report(record)
    assert 'id="plot-layer-cosine-missing"' in page and 'id="plot-layer-cosine"' not in page
    assert 'id="plot-bits-heatmap-missing"' in page and 'id="plot-position-cosine"' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "://" not in page and "<link" not in page and "@import" not in page
    assert '<strong>PASSED</strong>' in page
    with pytest.raises(AnepackError, match=r"report\.html: cannot write the report"):
        write_report(record, tmp_path / "no-such-dir" / "report.html")
    assert write_report(record, tmp_path / "report.html").read_text(encoding="utf-8") == page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
