"""report.html in a real headless Chromium: it renders, its plots decode, model text stays text.

Method. The page carries one inline script that, on the window's load event, checks every
<img> (complete and naturalWidth > 0) and writes the outcome to <body data-images="ok N">
(or "broken K/N"). Chromium loads the file:// page with --virtual-time-budget, so the load
event and the script run before --dump-dom serialises the DOM; the test reads the
attribute, the headings and the table from that dump. A page whose one image is not a PNG
must report "broken 1/1", which shows the check can fail. A screenshot checks that
something is painted (many distinct colours, not a blank page).

Needs the Debian package `chromium` (/usr/bin/chromium); skipped without it.
"""

import re
import subprocess
from pathlib import Path

import pytest

from prefalign.evaluation.report import write_report
from prefalign.evaluation.report_html import render_html

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium not installed: /usr/bin/chromium is absent "
    "(apt-get install -y chromium)")

EVIL = "<script>document.body.setAttribute('data-pwned', '1')</script> & <b>not bold</b>"


def chromium(tmp_path: Path, page: Path, *args: str) -> str:
    """Run headless Chromium on `page` with a throwaway profile; returns stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", *args, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def crafted_report() -> dict:
    """A report as evaluate() builds it, with a run, a sweep and hostile model text."""
    info = {"reward/mean": {"label": "reward", "description": "mean reward-model score"},
            "win_rate/reward": {"label": "win rate (RM)", "description": "ties count 1/2"},
            "kl": {"label": "KL", "description": "KL(model || reference)"}}
    metrics = {"base": {"reward/mean": 0.1, "win_rate/reward": 0.5, "kl": 0.0},
               "dpo": {"reward/mean": 0.7, "win_rate/reward": 0.81, "kl": 4.2},
               "ppo": {"reward/mean": 0.6, "win_rate/reward": 0.74, "kl": 6.0}}
    steps = range(1, 41)
    runs = {"dpo": {"path": "runs/dpo", "curves": {
                "loss": [[s, 0.69 * 0.97 ** s] for s in steps],
                "rewards/margins": [[s, 0.05 * s] for s in steps],
                "rewards/accuracies": [[s, min(1.0, 0.5 + s / 60)] for s in steps]}},
            "ppo": {"path": "runs/ppo", "curves": {
                "objective/scores": [[s, 0.2 + s / 80] for s in steps],
                "objective/kl": [[s, s / 7] for s in steps]}}}
    frontier = {"y": "reward/mean", "curves": {
        "DPO (beta sweep)": [{"kl": k, "reward": r, "label": b} for k, r, b in
                             [(1.0, 0.4, "0.5"), (2.5, 0.6, "0.1"), (5.0, 0.72, "0.05")]],
        "PPO (KL coef sweep)": [{"kl": k, "reward": r, "label": None} for k, r in
                                [(1.5, 0.3), (4.0, 0.5), (8.0, 0.62)]]}}
    examples = [{"prompt_index": i, "prompt": f"Prompt {i} {EVIL}",
                 "responses": {name: {"text": f"{name} answer {i}\nline two {EVIL}",
                                      "reward": 0.5, "length": 12, "finish_reason": "eos"}
                               for name in metrics}} for i in range(2)]
    intervals = {"dpo": {"reward/mean": {"value": 0.7, "ci95": [0.64, 0.76]},
                         "kl": {"value": 4.2, "ci95": [3.9, 4.6]}}}
    return {"title": "Evaluation report", "created": "2025-01-01T00:00:00+00:00",
            "intervals": intervals, "bootstrap": {"resamples": 1000, "seed": 0},
            "settings": {"baseline": "base", "reference": {"name": "base", "path": "base"},
                         "num_prompts": 2, "sampling": {"n": 1, "seed": 0}},
            "findings": ["DPO's frontier dominates PPO's", EVIL], "metrics": metrics,
            "metric_info": info, "frontier": frontier, "runs": runs, "examples": examples}


def test_report_renders_in_chromium(tmp_path):
    paths = write_report(crafted_report(), tmp_path / "report")
    dom = chromium(tmp_path, paths["html"], "--virtual-time-budget=5000", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="ok 3"' in body, body  # frontier + two runs, all decoded
    assert "data-pwned" not in body  # the hostile text never ran as a script
    for heading in ("Findings", "Comparison", "Reward vs KL", "Training curves",
                    "Example generations", "Settings"):
        assert f"<h2>{heading}</h2>" in dom
    table = re.search(r'<table class="metrics" id="comparison-table">.*?</table>', dom, re.S)
    assert table and all(f"<td>{name}" in table.group(0) for name in ("base", "dpo", "ppo"))
    assert "<td>0.81</td>" in table.group(0)
    # Intervals: "value ± half width", the ends in the tooltip, and what ± means.
    assert '<td title="95% interval [0.64, 0.76]">0.7 ± 0.06</td>' in table.group(0)
    assert "<td>4.2 ± 0.35</td>" not in table.group(0) and "4.2 ± 0.35</td>" in table.group(0)
    assert re.search(r'<p class="sub" id="interval-note">± is half the width of the 95%',
                     dom)
    assert "&lt;script&gt;document.body.setAttribute" in dom  # shown as text
    assert dom.count("<th>dpo</th>") == 2  # one column per model in each example table

    shot = tmp_path / "report.png"
    chromium(tmp_path, paths["html"], "--hide-scrollbars", "--window-size=1280,2400",
             f"--screenshot={shot}")
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    colours = {tuple(p) for p in pixels[::8, ::8, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 50  # text, table rules and plots, not an empty page


def test_image_check_reports_a_broken_image(tmp_path):
    """The negative control: the same check on a page whose image is not a PNG."""
    page = tmp_path / "broken.html"
    plots = [{"id": "frontier", "file": "frontier.png", "title": "x", "png": b"not a png"}]
    page.write_text(render_html({"metrics": {}}, plots), encoding="utf-8")
    dom = chromium(tmp_path, page, "--virtual-time-budget=5000", "--dump-dom")
    assert 'data-images="broken 1/1"' in dom
