"""The review page in a real browser: a version the gate blocked, opened in the MLflow UI.

A small face set and a fixture trunk train 8 reference and 6 calibration clean networks and one
backdoored fine-tune with our own trainer (fixed seeds, nothing redrawn); the default detector
with the GMM as evidence is fitted, published and run by the gate against a real ``mlflow server``.
Headless Chromium (Debian's ``chromium``, driven by Playwright) then opens the version's page and
a reviewer's path to the report. The expected texts are the tags read back from MLflow, i.e.
what the gate wrote; the test checks that the UI shows them, not what they should be.

Where Chromium (or Playwright) is missing the test is skipped with its reason in the ``-ra``
summary. The screenshot goes to the test's tmp directory, and also to
docs/mlflow-review-page.png when BACKDOOR_GATE_UPDATE_SCREENSHOTS=1 (its run names, hashes and
times change every run, so ``make test`` does not rewrite a tracked file each time).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from components import gate as G
from components import tags as T
from components.config import GateConfig
from components.explain_version import explain_version
from components.reference_store import publish_reference
from components.registry import MlflowRegistry
from components.trigger_search import ExplainConfig
from detector.config import WEIGHTS_ONLY_DETECTOR, ReferenceConfig
from detector.decision import BLOCKED
from detector.detectors import make_reference
from tests.conftest import FACE_NETS_SIZE

pytestmark = pytest.mark.slow

MODEL = "facenet-review-page"
REFERENCE_MODEL = "facenet-integrity-reference-review-page"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "mlflow-review-page.png"
UPDATE_ENV = "BACKDOOR_GATE_UPDATE_SCREENSHOTS"
#: the tags a reviewer needs: what was decided, why, whom the backdoor targets, where the report is
SHOWN = (T.VERDICT, T.REASON, T.SUSPECTED_CLASS, T.REPORT)

# Unclip the tag table for the screenshot: MLflow 3 shows tags in a 280 px scroll box inside a
# viewport-high scroll pane. The innermost scroller (the table body) loses its height limit; the
# return value is how much taller the viewport must be for the pane to show everything.
_UNCLIP_TABLE = """cell => {
  let e = cell.parentElement, table = null, extra = 0;
  for (; e && e !== document.body; e = e.parentElement) {
    const s = getComputedStyle(e);
    if (s.overflowY !== 'scroll' && s.overflowY !== 'auto') continue;
    if (!table) { table = e; e.style.maxHeight = 'none'; e.style.height = 'auto'; }
    else extra = Math.max(extra, e.scrollHeight - e.clientHeight);
  }
  return extra;
}"""


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium for Playwright, or a skip that says the page was not checked (session-scoped
    and requested first, so it skips before the MLflow server starts or a network is trained)."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright not installed: make setup (the review page was not checked)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed: apt-get install chromium (the review page was not checked)")
    return path


@pytest.fixture(scope="module")
def blocked(chromium, mlflow_server, face_nets, module_dir):
    """A version the gate blocked: registry, version number and the tags as MLflow returns them."""
    root, data = module_dir, face_nets["data"]
    # conftest's backdoor 2 (id00004 -> id00000); its success rate is asserted by test_detectors too
    assert face_nets["asr"][2] >= 0.8, face_nets["asr"]  # the backdoor works, else a block would prove nothing
    reference, calibration, backdoored = face_nets["reference"], face_nets["calibration"], face_nets["backdoored"][2]

    # the weights-only gate: this page is about what a reviewer sees of a block, and the default's margins
    # part draws its secret gallery from the OS each fit, so on this fixture (6 calibration networks)
    # whether the plain backdoor is blocked depends on the draw (seen: blocked by margins once, passed
    # once in CI); the weights-only gate blocked it in every run
    ref = make_reference(WEIGHTS_ONLY_DETECTOR, ReferenceConfig(grid=(1, 2, 5)), evidence=("gmm",))
    ref.fit(reference, base=face_nets["base"]).calibrate(calibration).save(root / "ref")
    reg = MlflowRegistry(mlflow_server.uri)
    config = GateConfig(reference_model=REFERENCE_MODEL)
    publish_reference(reg, root / "ref", config)
    v = reg.register(MODEL, {"model.safetensors": backdoored}, tags={T.REGISTERED_BY: "bot"})
    result = G.gate(MODEL, v.version, registry=reg, config=config)
    assert result.verdict == BLOCKED and result.suspected_class, result.reason
    # the pipeline's next step for a blocked version: reconstruct its trigger into the report (a small grid)
    quick = ExplainConfig(
        image_size=FACE_NETS_SIZE,
        locate_size=0.3,
        sizes=(0.3,),
        grid=3,
        steps=4,
        refine_steps=4,
        size_steps=6,
        faces=6,
        heldout=8,
        controls=1,
    )
    explained = explain_version(MODEL, v.version, reg, data, root / "explain", config=quick, gate_config=config)
    return reg, reg.version(MODEL, v.version), explained


def test_a_reviewer_sees_the_verdict_reason_suspect_and_report_in_the_browser(
    chromium, blocked, mlflow_server, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    reg, info, explained = blocked
    tags = info.tags
    assert tags[T.EXPLAIN_TRIGGER] == f"{explained['logged_to']}/trigger.png"  # the trigger is in the version's run
    run = reg.client.get_run(info.run_id)
    assert tags[T.REPORT].startswith(run.info.artifact_uri + "/"), tags[
        T.REPORT
    ]  # the report is an artifact of the version's run
    report_path = tags[T.REPORT][len(run.info.artifact_uri) + 1 :]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(f"{mlflow_server.uri}/#/models/{MODEL}/versions/{info.version}")

            # each tag's row, scrolled to as a reviewer would, is on screen with the gate's value
            for key in SHOWN:
                row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
                expect(row).to_have_count(1)
                row.scroll_into_view_if_needed()
                expect(row).to_be_in_viewport()  # not clipped by the table's scroll box
                expect(row.get_by_text(tags[key], exact=True)).to_be_visible()

            # the page shows the report's URI as text; its link is the source run, whose
            # Artifacts tab renders the report (the tree path is the one the tag names)
            source_run = page.get_by_role("link", name=run.info.run_name, exact=True)
            expect(source_run).to_be_visible()
            shot = tmp_path / SCREENSHOT.name
            page.get_by_role("button", name="Close", exact=True).click()  # the assistant side panel
            extra = page.get_by_text(T.VERDICT, exact=True).evaluate(_UNCLIP_TABLE)
            page.set_viewport_size({"width": 1400, "height": 1000 + extra})
            expect(page.get_by_text(T.VERDICT, exact=True)).to_be_in_viewport()
            page.screenshot(path=str(shot), full_page=True)

            source_run.click()
            page.get_by_role("tab", name="Artifacts").click()
            for part in report_path.split("/"):
                page.get_by_text(part, exact=True).first.click()
            report = page.frame_locator("iframe")
            expect(report.locator("h1")).to_contain_text(tags[T.VERDICT])
            expect(report.get_by_text(tags[T.REASON], exact=True)).to_be_visible()
            expect(report.locator(".victim")).to_contain_text(f"Suspected victim identity: {tags[T.SUSPECTED_CLASS]}")
            expect(report.locator(".victim")).to_be_visible()
            # the reconstructed trigger, beside the deviation plot, for the victim the gate named
            expect(report.locator("img.trigger")).to_be_visible()
            assert report.locator("img.trigger").evaluate("i => i.naturalWidth") > 0  # a picture that decodes
            expect(report.locator(".explain")).to_contain_text(f"classified as {tags[T.SUSPECTED_CLASS]}")
            expect(report.locator(".explain")).to_contain_text("The smallest patch tried")  # the size rule's opinion
            page.screenshot(path=str(tmp_path / "mlflow-review-report.png"))
        finally:
            browser.close()

    assert Image.open(shot).size[0] == 1400
    if os.environ.get(UPDATE_ENV) == "1":
        shutil.copyfile(shot, SCREENSHOT)
