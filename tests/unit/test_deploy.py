"""The deployment files in deploy/ and docs/operations.md: they parse, they check out with the real tools when
those are installed (systemd-analyze, promtool), and every metric they name is one batchd exports.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "batchd.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "batchd-dashboard.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
OPERATIONS = ROOT / "docs" / "operations.md"

DEFAULT_GRACE = Settings.model_fields["shutdown_grace_seconds"].default


# --- metric names ---------------------------------------------------------------------------------------


def _registry_names() -> tuple[set[str], set[str]]:
    """(every series name batchd.metrics.REGISTRY can export, the primary name of each family).

    A histogram's _bucket/_sum/_count and a counter's _total count as the family's names. The queue gauges
    export samples only on the replica holding the metrics lease, so their names come from the registry's
    name table (filled from each collector's describe()) rather than from a collect().
    """
    from batchd.metrics import REGISTRY

    every: set[str] = set()
    primary: set[str] = set()
    for family in REGISTRY.collect():
        every.add(family.name)
        every.update(sample.name for sample in family.samples)
        if family.type == "counter":
            every.update({f"{family.name}_total", f"{family.name}_created"})
            primary.add(f"{family.name}_total")
        elif family.type == "histogram":
            every.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created"))
            primary.add(family.name)
        elif family.type == "summary":
            every.update(f"{family.name}{suffix}" for suffix in ("_sum", "_count", "_created"))
            primary.add(family.name)
        elif family.type == "info":
            every.add(f"{family.name}_info")
            primary.add(f"{family.name}_info")
        else:
            primary.add(family.name)
    described = set(getattr(REGISTRY, "_names_to_collectors", {}))
    for name in described - every:
        # Declared but exporting nothing right now (the lease-held gauges): a family of its own.
        primary.add(name)
    every |= described
    return every, primary


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    return _registry_names()[0]


@pytest.fixture(scope="module")
def metric_families() -> set[str]:
    return _registry_names()[1]


# Words in a PromQL expression that are not series names.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "atan2", "inf", "nan",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile",
}  # fmt: skip
# Series Prometheus makes itself, which the rules may use.
_PROMETHEUS_SERIES = {"up"}


def promql_series(expr: str) -> set[str]:
    """The series names an expression selects (a small lexer: enough for the rules and panels here)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_series_lexer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(batchd_request_latency_seconds_bucket{job=~"$job"}'
        '[$__rate_interval]))) > 1e3 and on (job) group_left sum by (job) (up{job="x"} == 1)'
        " unless min_over_time(max by (job) (batchd_open_batches)[6h:5m]) > 0.8 * 2147483648"
    )
    assert promql_series(expr) == {"batchd_request_latency_seconds_bucket", "up", "batchd_open_batches"}


def _check_known(exprs: dict[str, str], metric_names: set[str]) -> None:
    unknown = {}
    for where, expr in exprs.items():
        names = promql_series(expr)
        assert names, f"{where}: selects no series: {expr}"
        missing = names - metric_names - _PROMETHEUS_SERIES
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"names that batchd.metrics.REGISTRY does not export: {unknown}"


def test_registry_has_the_documented_metrics(metric_families: set[str]) -> None:
    """The contract the deploy files are written against (docs/operations.md lists the same names)."""
    expected = {
        "batchd_requests_submitted_total",
        "batchd_requests_retried_total",
        "batchd_results_total",
        "batchd_batches_created_total",
        "batchd_batch_requests",
        "batchd_request_latency_seconds",
        "batchd_cost_usd_total",
        "batchd_savings_usd_total",
        "batchd_tokens_total",
        "batchd_api_requests_total",
        "batchd_api_errors_total",
        "batchd_intake_pending_requests",
        "batchd_intake_pending_bytes",
        "batchd_intake_oldest_age_seconds",
        "batchd_open_batches",
        "batchd_replicas",
        "batchd_build_info",
    }
    assert expected <= metric_families, sorted(expected - metric_families)


# --- systemd --------------------------------------------------------------------------------------------


def _unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat, so no configparser)."""
    entries = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for section, key, value in _unit_entries(UNIT):
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, f"unexpected time span {value!r}"
    number = float(match.group(1))
    return number * 60 if match.group(2) in ("min", "m") else number


def test_unit_service_settings(unit: dict[str, list[str]]) -> None:
    def one(key: str) -> str:
        assert key in unit, f"{key} missing from {UNIT.name}"
        return unit[key][-1]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert _seconds(one("Service.WatchdogSec")) == 30
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillSignal") == "SIGTERM"
    assert _seconds(one("Service.TimeoutStopSec")) > DEFAULT_GRACE
    argv = shlex.split(one("Service.ExecStart"))
    assert Path(argv[0]).name == "batchd" and argv[1] == "run"
    assert one("Service.LoadCredential") == "anthropic_api_key:/etc/batchd/anthropic_api_key"
    assert one("Install.WantedBy") == "multi-user.target"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictRealtime", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
    ],
)
def test_unit_hardening(unit: dict[str, list[str]], key: str, value: str) -> None:
    assert unit.get(f"Service.{key}", [None])[-1] == value


def test_unit_syscall_filter(unit: dict[str, list[str]]) -> None:
    assert "@system-service" in unit["Service.SystemCallFilter"]


def test_unit_keeps_proc_readable(unit: dict[str, list[str]]) -> None:
    # Deliberate (see the unit's comment): ProcSubset=pid would hide /proc/stat, /proc/meminfo, /proc/sys.
    assert "Service.ProcSubset" not in unit


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks the executable)."""
    text = UNIT.read_text(encoding="utf-8")
    binary = shutil.which("batchd") or "/bin/true"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/usr/local/bin/batchd", binary), encoding="utf-8")
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(unit_copy: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on mere warnings (an unknown key, say): any line about our unit is a failure.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if unit_copy.name in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_security_exposure_stays_low(unit_copy: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "offline" in proc.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    # 1.1 when written (systemd 252); docs/operations.md records it. 2.0 leaves room for systemd's scoring.
    assert float(match.group(1)) <= 2.0


# --- Dockerfile -----------------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE)


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_dockerfile_base_is_python_slim(dockerfile: list[tuple[str, str]]) -> None:
    args = {}
    for word, rest in dockerfile:
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    bases = [rest.split()[0] for word, rest in dockerfile if word == "FROM"]
    assert bases
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], base)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", resolved), resolved


def test_dockerfile_runs_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    users = [rest for word, rest in _final_stage(dockerfile) if word == "USER"]
    assert users, "the final stage never sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user


def test_dockerfile_entrypoint_and_health(dockerfile: list[tuple[str, str]]) -> None:
    final = dict(_final_stage(dockerfile))  # last of each instruction wins, as in Docker
    # Exec form must be valid JSON: otherwise Docker silently falls back to the shell form.
    assert json.loads(final["ENTRYPOINT"]) == ["batchd"]
    assert json.loads(final["CMD"]) == ["run"]
    assert "9464" in final["EXPOSE"].split()
    env = final["ENV"]
    assert "BATCHD_METRICS_HOST=0.0.0.0" in env.split()
    health = final["HEALTHCHECK"]
    assert "CMD" in health
    health_argv = json.loads(health[health.index("CMD") + len("CMD") :].strip())
    assert health_argv[0] == "python" and "/healthz" in health_argv[-1]
    compile(health_argv[-1], "<healthcheck>", "exec")
    assert final.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"


# --- compose --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = redis["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert re.search(r"--appendonly\s+yes", command)
    assert re.search(r"--maxmemory-policy\s+noeviction", command)
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


def test_compose_batchd(compose: dict[str, Any]) -> None:
    batchd = compose["services"]["batchd"]
    assert (COMPOSE.parent / batchd["build"]["context"]).resolve() == ROOT
    assert (ROOT / batchd["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = batchd["environment"]
    assert env["BATCHD_REDIS_URL"] == "redis://redis:6379/0"
    assert env["CREDENTIALS_DIRECTORY"] == "/run/secrets"
    assert env["BATCHD_METRICS_HOST"] == "0.0.0.0"
    assert "anthropic_api_key" in batchd["secrets"]
    assert "anthropic_api_key" in compose["secrets"]
    assert _seconds(batchd["stop_grace_period"]) > DEFAULT_GRACE
    # Every BATCHD_* it sets is a real setting.
    fields = {f"BATCHD_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("BATCHD_")} <= fields


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"


def test_grafana_provisioning_parses() -> None:
    files = sorted(GRAFANA_PROVISIONING.rglob("*.yml"))
    assert files
    for path in files:
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["apiVersion"] == 1


# --- Prometheus -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_prometheus_config_scrapes_batchd() -> None:
    data = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert data["rule_files"] == [ALERTS.name]
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    targets = [
        f"{name}:{sd['port']}" for sd in jobs["batchd"].get("dns_sd_configs", []) for name in sd["names"]
    ] + [target for sc in jobs["batchd"].get("static_configs", []) for target in sc["targets"]]
    assert "batchd:9464" in targets


def test_alert_rules_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    for rule in alert_rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    # The alerts the operations guide promises.
    for wanted in (
        "BatchdDown",
        "BatchdIntakeBacklogOld",
        "BatchdNoResultsWhileBatchesOpen",
        "BatchdErroredRatioHigh",
        "BatchdApiErrors",
    ):
        assert wanted in names


def test_alert_rules_name_only_real_metrics(
    alert_rules: list[dict[str, Any]], metric_names: set[str]
) -> None:
    _check_known({rule["alert"]: rule["expr"] for rule in alert_rules}, metric_names)


def test_alerts_are_documented(alert_rules: list[dict[str, Any]]) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = [rule["alert"] for rule in alert_rules if rule["alert"] not in text]
    assert not missing, f"alerts not described in docs/operations.md: {missing}"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    proc = _promtool("check", "config", str(PROMETHEUS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    proc = _promtool("test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Grafana --------------------------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard_exprs() -> dict[str, str]:
    model = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert model["uid"] == "batchd" and model["title"]
    exprs = {}
    for panel in _panels(model["panels"]):
        for target in panel.get("targets", []):
            exprs[f"{panel['title']}/{target['refId']}"] = target["expr"]
    return exprs


def test_dashboard_covers_the_essentials(dashboard_exprs: dict[str, str]) -> None:
    text = "\n".join(dashboard_exprs.values())
    for needle in (
        "batchd_intake_pending_requests",
        "batchd_intake_oldest_age_seconds",
        "batchd_open_batches",
        "batchd_results_total",
        "histogram_quantile(0.99, sum by (le) (rate(batchd_request_latency_seconds_bucket",
        "batchd_cost_usd_total",
        "batchd_savings_usd_total",
        "batchd_api_errors_total",
    ):
        assert needle in text


def test_dashboard_names_only_real_metrics(dashboard_exprs: dict[str, str], metric_names: set[str]) -> None:
    _check_known(dashboard_exprs, metric_names)


def test_dashboard_panel_ids_unique() -> None:
    model = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in _panels(model["panels"])]
    assert len(ids) == len(set(ids))


@needs_promtool
def test_dashboard_queries_parse(dashboard_exprs: dict[str, str], tmp_path: Path) -> None:
    """promtool parses each panel query, Grafana's variables replaced by plausible values."""
    rules = []
    for i, expr in enumerate(dashboard_exprs.values()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$__range", "6h").replace("$job", "batchd")
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- docs/operations.md ---------------------------------------------------------------------------------


def test_operations_guide_documents_every_metric(metric_names: set[str], metric_families: set[str]) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"\bbatchd_[a-z_]+[a-z]\b", text))
    assert not mentioned - metric_names, (
        f"docs name metrics batchd does not export: {mentioned - metric_names}"
    )
    undocumented = sorted(name for name in metric_families if name not in mentioned)
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"
