"""The dashboard (`[http] dashboard`), driven in a real browser against a real daemon.

One node per module, with the dashboard behind basic auth and a storescp as its PACS, gets
three series over DICOM: a phantom (segmented, delivered: done, with segments, measurements
and a preview), a soft-tissue cylinder (no findings) and a series whose pixel data is cut
short (the worker cannot assemble it: failed). Debian's chromium, headless, driven by selenium
through Debian's chromedriver (nothing downloaded), loads the pages, reads the states from
the DOM and retries the failed job with the page's button. The credentials, the forgery
checks and the patient identifiers are checked over plain HTTP. With
DICOM_NODE_SCREENSHOTS=DIR the browser's screenshots are saved there too (docs/ holds them).
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from dicom_node.app.config import ConfigError, HttpConfig, load_config
from dicom_node.net.access import check_permissions
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, destination_toml
from dicom_node.testbed.peers import StoreSCP, free_port
from dicom_node.web.dashboard import Dashboard
from dicom_node.web.server import HttpEndpoint
from model.volume_io import Volume
from tests.support import PhantomSeries

USER, PASSWORD, TOKEN = "admin", "correct horse battery", "0123456789abcdef0123"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PHANTOM_PATIENT = ("PHANTOM^SEED1003", "PH1003")  # write_phantom's synthetic patient


@dataclass
class Site:
    """The module's node, its HTTP port and its jobs by what they are."""

    node: NodeProcess
    port: int
    jobs: dict[str, int]  # "phantom", "no_bone", "broken" -> job id


def _cylinder(directory: Path, seed: str) -> list[Path]:
    """A soft-tissue cylinder in air, 30 slices of 64 x 64: no bone, segmented in seconds."""
    _, y, x = np.mgrid[:30, :64, :64]
    hu = np.where((y - 32) ** 2 + (x - 32) ** 2 < 26**2, 40, -1000).astype(np.int16)
    volume = Volume(hu, spacing=(1.5, 1.5, 2.0), origin=(-48.0, -48.0, 0.0))
    patient = PatientInfo(name="CYLINDER^DASH", patient_id="CYL-DASH", sex="O")
    return write_ct_series(volume, directory, patient=patient, uid_seed=seed)


def _cut_short(files: list[Path]) -> None:
    """The middle slice's pixel data loses its second half, as from a sender's faulty disk."""
    middle = files[len(files) // 2]
    dataset = dcmread(middle)
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    dataset.save_as(middle)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, phantom_series: PhantomSeries) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    with StoreSCP(directory / "pacs") as pacs:
        http = (
            f"[http]\nenabled = true\nport = {port}\n"
            f'username = "{USER}"\npassword = "{PASSWORD}"\ntoken = "{TOKEN}"\n'
        )
        node = NodeProcess(
            directory / "node", extra_config=http + destination_toml(pacs.destination("pacs"))
        )
        node.start()
        try:
            _cylinder(directory / "no_bone", "dashboard-no-bone")
            _cut_short(_cylinder(directory / "broken", "dashboard-broken"))
            uids = {
                name: node.send_series(folder)
                for name, folder in [
                    ("phantom", phantom_series(1003)["ct"]),
                    ("no_bone", directory / "no_bone"),
                    ("broken", directory / "broken"),
                ]
            }
            node.wait_for_states({uids["phantom"]}, {"done"}, timeout=600)
            node.wait_for_states({uids["no_bone"]}, {"no_findings"}, timeout=600)
            node.wait_for_states({uids["broken"]}, {"failed"}, timeout=600)
            by_uid = {uid: name for name, uid in uids.items()}
            jobs = {by_uid[s["series_instance_uid"]]: s["id"] for s in node.status()["series"]}
            yield Site(node, port, jobs)
        finally:
            assert node.stop() == 0, node.log.read_text()


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: str = ""
) -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return (
            response.status,
            dict(response.getheaders()),
            response.read().decode(errors="replace"),
        )
    finally:
        connection.close()


# -- in a browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless chromium, sending the dashboard's basic-auth header with every request."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium or chromium-driver not installed (make system-deps installs both)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": BASIC}})
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    """The whole page (Chrome's DevTools protocol), into tmp_path and, if set, into
    $DICOM_NODE_SCREENSHOTS (docs/ keeps them)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    folders = [tmp_path, *(Path(d) for d in [os.environ.get("DICOM_NODE_SCREENSHOTS")] if d)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(base64.b64decode(shot["data"]))


def _table(driver: WebDriver, table_id: str) -> list[list[str]]:
    """A table's body as cell texts, read in one script: the page refreshes its live part
    every few seconds, which would leave elements found one by one stale."""
    script = (
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(row => [...row.cells].map(cell => cell.textContent.trim()))"
    )
    return driver.execute_script(script, f"#{table_id} tbody tr")


def test_the_jobs_page_and_a_job_page_show_the_jobs_states_and_results(
    site: Site, browser: WebDriver, tmp_path: Path
) -> None:
    driver = browser
    driver.get(f"http://127.0.0.1:{site.port}/")
    jobs = {int(row[0]): row for row in _table(driver, "jobs")}
    assert {job: row[5] for job, row in jobs.items()} == {
        site.jobs["phantom"]: "done",
        site.jobs["no_bone"]: "no_findings",
        site.jobs["broken"]: "failed",
    }
    broken = jobs[site.jobs["broken"]]
    assert broken[3] == "SCANNER"  # the calling AE
    assert "cannot decode pixel data" in broken[6]
    assert int(broken[4]) == 30  # instances
    assert not any(identifier in driver.page_source for identifier in PHANTOM_PATIENT)
    _screenshot(driver, tmp_path, "dashboard.png")

    driver.find_element(By.LINK_TEXT, str(site.jobs["phantom"])).click()
    WebDriverWait(driver, 10).until(lambda _: driver.find_elements(By.ID, "segments"))
    assert driver.find_element(By.ID, "state").text == "done"
    segments = {row[0]: float(row[1]) for row in _table(driver, "segments")}
    assert set(segments) == {"Left femur", "Left hip bone"}
    assert min(segments.values()) > 10  # ml
    measurements = {row[1]: row[2] for row in _table(driver, "measurements")}
    assert measurements["femoral_head_radius"].endswith(" mm")
    deliveries = {row[0]: row for row in _table(driver, "deliveries")}
    assert deliveries["pacs"][3] == "delivered"
    states = [row[2] for row in _table(driver, "timeline")]
    assert states[-3:] == ["segmenting", "sending", "done"]
    script = "const preview = document.getElementById('preview');"
    script += "return preview.complete && preview.naturalWidth"
    WebDriverWait(driver, 10).until(lambda _: driver.execute_script(script))
    assert driver.execute_script(script) > 100  # pixels: the PNG was drawn and loaded
    # The measurements' key image, as the worker drew it beside the SEG.
    key = "const key = document.getElementById('key-image');"
    key += "return key.complete && key.naturalWidth"
    WebDriverWait(driver, 10).until(lambda _: driver.execute_script(key))
    assert driver.execute_script(key) > 100
    assert not driver.find_elements(By.ID, "retry")  # done: no action
    assert not any(identifier in driver.page_source for identifier in PHANTOM_PATIENT)
    _screenshot(driver, tmp_path, "dashboard_job.png")


def test_retry_in_the_browser_queues_the_failed_job_and_the_page_follows_it(
    site: Site, browser: WebDriver
) -> None:
    driver = browser
    job = site.jobs["broken"]
    driver.get(f"http://127.0.0.1:{site.port}/jobs/{job}")
    assert driver.find_element(By.ID, "state").text == "failed"
    driver.find_element(By.CSS_SELECTOR, "#retry button").click()

    # The POST's answer leads back to the job: queued by the retry, the first failure before.
    WebDriverWait(driver, 10).until(
        lambda _: any(row[3] == "retry requested" for row in _table(driver, "timeline"))
    )
    assert driver.current_url.endswith(f"/jobs/{job}")
    states = [row[2] for row in _table(driver, "timeline")]
    assert states[states.index("failed") + 1] == "queued"
    # The node segments it again and it fails again: the page shows it without a reload.
    driver.execute_script("window.notReloaded = true")
    WebDriverWait(driver, 120, poll_frequency=0.5).until(
        lambda _: [row[2] for row in _table(driver, "timeline")].count("failed") == 2
    )
    assert driver.execute_script("return window.notReloaded") is True
    assert driver.find_element(By.ID, "state").text == "failed"
    assert driver.find_elements(By.ID, "retry")


# -- over HTTP -------------------------------------------------------------------------------


def test_the_dashboard_asks_for_its_credentials_and_metrics_do_not(site: Site) -> None:
    job = f"/jobs/{site.jobs['no_bone']}"
    status, headers, _ = _request(site.port, "GET", job)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="dicom-node"')
    wrong = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    assert _request(site.port, "GET", job, {"Authorization": wrong})[0] == 401
    assert _request(site.port, "GET", job, {"Authorization": "Bearer not-the-token"})[0] == 401
    for authorization in (
        BASIC,
        f"Bearer {TOKEN}",
        "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode(),  # a browser's token
    ):
        status, headers, page = _request(site.port, "GET", job, {"Authorization": authorization})
        assert status == 200, authorization
        assert "no_findings" in page
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert _request(site.port, "GET", "/metrics")[0] == 200
    assert _request(site.port, "GET", "/readyz")[0] == 200
    # No bone, no measurements: no key image, and none served.
    assert 'id="key-image"' not in page
    assert _request(site.port, "GET", f"{job}/key.png", {"Authorization": BASIC})[0] == 404


def test_a_retry_without_the_form_or_from_another_site_is_refused(site: Site) -> None:
    job = site.jobs["no_bone"]  # not failed: a retry that got through would answer 409
    _, _, page = _request(
        site.port, "GET", f"/jobs/{site.jobs['broken']}", {"Authorization": BASIC}
    )
    form_token = page.split('name="form_token" value="', 1)[1].split('"', 1)[0]
    form = {"Authorization": BASIC, "Content-Type": "application/x-www-form-urlencoded"}
    retry = f"/jobs/{job}/retry"
    refusals = [
        (form, ""),
        (form, urlencode({"form_token": "guessed"})),
        ({**form, "Origin": "http://evil.example"}, urlencode({"form_token": form_token})),
        ({**form, "Sec-Fetch-Site": "cross-site"}, urlencode({"form_token": form_token})),
    ]
    for headers, body in refusals:
        status, _, page = _request(site.port, "POST", retry, headers, body)
        assert status == 403, (headers, body)
        assert "retry refused" in page
    no_credentials = {"Content-Type": form["Content-Type"]}
    body = urlencode({"form_token": form_token})
    assert _request(site.port, "POST", retry, no_credentials, body)[0] == 401
    origin = {**form, "Origin": f"http://127.0.0.1:{site.port}", "Host": f"127.0.0.1:{site.port}"}
    status, _, page = _request(site.port, "POST", retry, origin, body)
    assert status == 409  # through both checks: the state machine's answer
    assert "failed jobs are retried" in page
    assert site.node.db_state(_series_uid(site, job)) == "no_findings"


def _series_uid(site: Site, job: int) -> str:
    (series,) = [s for s in site.node.status()["series"] if s["id"] == job]
    return str(series["series_instance_uid"])


def _dashboard_beside(site: Site, config: HttpConfig) -> HttpEndpoint:
    """A second endpoint, in this process, over the module node's data_dir (the same files
    and database): for settings the node does not have."""
    data_dir = site.node.data_dir
    state = NodeState(f"sqlite:///{data_dir / 'node.db'}")
    dashboard = Dashboard(config, state, Spool(data_dir / "spool"), data_dir / "results")
    endpoint = HttpEndpoint(config, CollectorRegistry(), dashboard)
    endpoint.start()
    return endpoint


def test_patient_identifiers_are_shown_only_when_configured(site: Site) -> None:
    job = f"/jobs/{site.jobs['phantom']}"
    _, _, page = _request(site.port, "GET", job, {"Authorization": BASIC})
    assert not any(identifier in page for identifier in PHANTOM_PATIENT)
    config = HttpConfig(enabled=True, port=free_port(), show_patient_identifiers=True)
    endpoint = _dashboard_beside(site, config)
    try:
        status, _, page = _request(config.port, "GET", job)
        # The failed job has no SEG: its spooled instances give the names.
        _, _, broken = _request(config.port, "GET", f"/jobs/{site.jobs['broken']}")
    finally:
        endpoint.stop()
    assert status == 200
    assert all(identifier in page for identifier in PHANTOM_PATIENT)
    assert "CYLINDER^DASH" in broken and "CYL-DASH" in broken


def test_without_credentials_it_answers_to_this_machines_name_only(site: Site) -> None:
    """Loopback without credentials: a page reached by another name (DNS rebinding) is
    refused; a retry still needs the form's token."""
    config = HttpConfig(enabled=True, port=free_port())
    endpoint = _dashboard_beside(site, config)
    try:
        assert _request(config.port, "GET", "/", {"Host": f"127.0.0.1:{config.port}"})[0] == 200
        assert _request(config.port, "GET", "/", {"Host": f"localhost:{config.port}"})[0] == 200
        rebound = {"Host": f"attacker.example:{config.port}"}
        assert _request(config.port, "GET", "/", rebound)[0] == 403
        retry = f"/jobs/{site.jobs['broken']}/retry"
        status, _, page = _request(config.port, "POST", retry, {}, "form_token=x")
        assert status == 403 and "retry refused" in page
    finally:
        endpoint.stop()


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.7", "node.example"])
def test_a_dashboard_bound_beyond_loopback_needs_credentials(tmp_path: Path, bind: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\nenabled = true\nbind = "{bind}"\n')
    with pytest.raises(ConfigError, match=r"needs http\.token or http\.username"):
        load_config(config)
    for allowed in (f'token = "{TOKEN}"', "dashboard = false"):
        config.write_text(f'[http]\nenabled = true\nbind = "{bind}"\n{allowed}\n')
        assert load_config(config).http.bind == bind


def test_the_node_refuses_to_start_with_an_open_dashboard_beyond_loopback(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, extra_config='[http]\nenabled = true\nbind = "0.0.0.0"\n')
    result = node.cli("serve")
    assert result.returncode != 0
    assert "needs http.token or http.username and http.password" in result.stderr
    assert not node.data_dir.exists()  # refused before anything was written


def test_a_config_file_holding_the_dashboards_credentials_must_not_be_readable_by_all(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[node]\ndata_dir = "data"\n[http]\ntoken = "{TOKEN}"\n')
    path.chmod(0o644)
    assert check_permissions(load_config(path), path) == [path]
    path.chmod(0o640)
    assert check_permissions(load_config(path), path) == []
