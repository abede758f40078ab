"""Screenshots of what a researcher sees after ``make repro``: the MLflow UI's runs table and
compare view of the study store, and the ``dvc plots show`` page, all in headless Chromium.

    python scripts/screenshots.py [--out reports] [--params params.yaml]

Starts ``mlflow server`` (what ``mlflow ui`` runs) on the study's store on a free local port,
opens the experiment's page (the runs table, the experiment being a training one) and the compare
view of the pretraining runs, renders ``dvc plots show`` to a folder and opens its page from disk.
Every host but 127.0.0.1 fails to resolve in the browser, as on an offline cluster node. Chromium
is Debian's (``apt-get install chromium`` when it is missing, as root), driven by Playwright
(``make screenshots`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ssltk.config import load_config

MODEL_TRAINING = {"workflowType": "machine_learning"}
COMPARE_PARAMS = ["pretext.task", "model.arch"]
COMPARE_METRICS = ["cell/top1_pre_logits", "cell/top1_best_layer", "cell/gain_best_layer"]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline: no CDN, no hub
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("screenshots: Chromium is missing; install it: sudo apt-get install chromium")
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True)
    return shutil.which("chromium") or sys.exit("screenshots: apt-get installed no chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(store_uri: str, artifacts: Path):
    """``mlflow server`` (the UI and its REST API) on ``store_uri``, yielding its base URL once
    it answers."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", store_uri, "--default-artifact-root", artifacts.as_uri()),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("screenshots: mlflow ui did not start within 60 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3.17's UI picks its view from ``workflowType`` (in
    the URL, else the browser's storage; GenAI by default), not from the experiment's kind."""
    return f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(MODEL_TRAINING)}"


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@contextmanager
def browser_page(executable: str):
    """A headless Chromium page (Playwright driving Debian's Chromium), 1920 × 1080."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1920, "height": 1080})
        finally:
            browser.close()


#: The runs table's expander of a parent run, while it is collapsed (its icon is a plus).
COLLAPSED_PARENT = 'button[data-component-id*="runnamecellrenderer"]:has(path[d^="M7.25 7.25V4.5"])'


def expand_nested_runs(page, most: int = 100) -> None:
    """Open every parent row of the runs table (rows appear below each one opened)."""
    for _ in range(most):
        collapsed = page.locator(COLLAPSED_PARENT)
        if collapsed.count() == 0:
            return
        collapsed.first.click()
        page.wait_for_timeout(500)


def choose_in_compare_view(page, params: list[str], metrics: list[str]) -> None:
    """The parallel-coordinates plot of ``params`` against ``metrics`` (the UI's default is the
    first metric by name, ``train/lr``)."""
    page.get_by_role("button", name="Clear All").click()
    for box, names in zip(page.get_by_role("combobox").all()[:2], (params, metrics), strict=False):
        for name in names:
            box.click()
            box.fill(name)
            page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.get_by_text("Comparing").first.scroll_into_view_if_needed()


def screenshot(page, url: str, out: Path, wait_for: str | None = None, expand: bool = False):
    """Open ``url``, wait for the text ``wait_for`` (the UI polls, so the network never goes
    idle), close MLflow's assistant panel, open nested runs if ``expand``, save a screenshot."""
    page.goto(url)
    if wait_for:
        page.get_by_text(wait_for).first.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)
    for button in page.get_by_role("button", name="Close", exact=True).all():
        if button.is_visible():
            button.click()
    if expand:
        expand_nested_runs(page)
    if url.split("#/")[-1].startswith("compare-runs"):
        choose_in_compare_view(page, COMPARE_PARAMS, COMPARE_METRICS)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def mlflow_pages(page, params: Path, out: Path) -> None:
    config = load_config(params)
    uri = config.tracking.resolved_uri()
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlruns"
    with mlflow_ui(uri, artifacts) as base:
        name = urllib.parse.quote(config.tracking.experiment)
        experiment = api(base, f"experiments/get-by-name?experiment_name={name}")["experiment"]
        eid = experiment["experiment_id"]
        found = api(
            base,
            "runs/search",
            {"experiment_ids": [eid], "filter": "tags.`ssltk.kind` = 'pretrain'"},
        )
        runs = [r["info"]["run_id"] for r in found.get("runs", [])]
        study = f"study-{config.tracking.experiment}"  # the top row of the runs table
        runs_table = experiment_url(base, eid)
        screenshot(page, runs_table, out / "mlflow_runs.png", wait_for=study, expand=True)
        query = urllib.parse.urlencode(
            {"runs": json.dumps(runs), "experiments": json.dumps([eid]), **MODEL_TRAINING}
        )
        first = found["runs"][0]["info"]["run_name"]
        compare = f"{base}/#/compare-runs?{query}"
        screenshot(page, compare, out / "mlflow_compare.png", wait_for=first)


def dvc_plots_page(page, out: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
        subprocess.run([dvc, "plots", "show", "--out", folder], check=True, capture_output=True)
        index = Path(folder) / "index.html"
        screenshot(page, index.as_uri(), out / "dvc_plots.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with browser_page(chromium()) as page:
        mlflow_pages(page, args.params, args.out)
        dvc_plots_page(page, args.out)


if __name__ == "__main__":
    main()
