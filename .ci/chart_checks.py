"""Checks of one `helm template` rendering of helm/pgmm, for .ci/chart-checks.

    python chart_checks.py split RENDERED OUTDIR
        Writes OUTDIR/builtin.yaml (the Kubernetes built-in kinds, for kubernetes-validate),
        OUTDIR/crds.yaml (ServiceMonitor, PrometheusRule), OUTDIR/rules.yaml (the PrometheusRule's
        groups as a plain Prometheus rules file, when there is one) and OUTDIR/node-N.toml (the
        pgmm config of every ordinal). Fails if a document does not parse or a CRD document lacks
        what the Prometheus Operator needs.

    python chart_checks.py check RENDERED REPLICAS
        Checks the rendering's pgmm wiring: one config per ordinal, each with its own node name,
        the same ordered [cluster] nodes, [[peers]] = the other nodes at their headless-Service
        addresses, StatefulSet replicas and checksum annotation, probes, security context.

    python chart_checks.py expect-rules RULES NAME=EXPR_SUBSTRING...
        Checks that alert NAME's expression contains EXPR_SUBSTRING (threshold substitution).

    python chart_checks.py dashboard DASHBOARD_JSON
        Checks that the Grafana dashboard parses and has a panel for every metric it must show.

Uses PyYAML (a dependency of kubernetes-validate, so present in its venv) and tomllib.
"""

import json
import re
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: the TOML checks are skipped
    tomllib = None

CRD_GROUP = "monitoring.coreos.com/"


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def load_docs(path):
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{path} is not valid YAML: {e}")
    for d in docs:
        if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
            fail(f"{path}: a document without apiVersion/kind: {str(d)[:200]}")
    return docs


def split(rendered, outdir):
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_docs(rendered)
    builtin = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUP)]
    crds = [d for d in docs if d["apiVersion"].startswith(CRD_GROUP)]
    (out / "builtin.yaml").write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    (out / "crds.yaml").write_text(yaml.safe_dump_all(crds, sort_keys=False))
    for d in crds:
        name = d.get("metadata", {}).get("name")
        spec = d.get("spec")
        if d["apiVersion"] != "monitoring.coreos.com/v1" or not name or not isinstance(spec, dict):
            fail(f"CRD document {d['kind']} needs apiVersion monitoring.coreos.com/v1, a name and a spec")
        if d["kind"] == "ServiceMonitor":
            eps = spec.get("endpoints") or []
            if not spec.get("selector", {}).get("matchLabels") or not eps:
                fail("ServiceMonitor needs selector.matchLabels and endpoints")
            if not all(e.get("port") and e.get("path") == "/metrics" for e in eps):
                fail("every ServiceMonitor endpoint must scrape a named port at /metrics")
        elif d["kind"] == "PrometheusRule":
            groups = spec.get("groups")
            if not groups:
                fail("PrometheusRule has no spec.groups")
            (out / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        else:
            fail(f"unexpected CRD kind {d['kind']}")
        print(f"  ok: {d['kind']}/{name} parses and has what the Prometheus Operator needs")
    for d in docs:
        if d["kind"] == "ConfigMap" and any(k.endswith(".toml") for k in (d.get("data") or {})):
            for key, text in d["data"].items():
                (out / key).write_text(text)
    print(f"  {len(builtin)} built-in document(s), {len(crds)} CRD document(s)")


def by_kind(docs, kind, component=None):
    found = [d for d in docs if d["kind"] == kind]
    if component:
        found = [d for d in found
                 if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    if len(found) != 1:
        fail(f"expected one {kind}{' (' + component + ')' if component else ''}, found {len(found)}")
    return found[0]


def check(rendered, replicas, donor="0"):
    """donor: the ordinal every other node joins from, or "none" (join.enabled=false)."""
    replicas = int(replicas)
    docs = load_docs(rendered)
    sts = by_kind(docs, "StatefulSet")
    headless = by_kind(docs, "Service", "peers")
    client = by_kind(docs, "Service", "client")
    ns = sts["metadata"]["namespace"]
    fullname = sts["metadata"]["name"]
    if sts["spec"]["replicas"] != replicas:
        fail(f"StatefulSet replicas {sts['spec']['replicas']}, expected {replicas}")
    if sts["spec"]["serviceName"] != headless["metadata"]["name"]:
        fail("StatefulSet serviceName is not the headless Service")
    if headless["spec"].get("clusterIP") != "None" or not headless["spec"].get("publishNotReadyAddresses"):
        fail("the headless Service needs clusterIP None and publishNotReadyAddresses")
    if sts["spec"].get("podManagementPolicy") != "Parallel":
        fail("podManagementPolicy must be Parallel (readiness needs the peers)")
    pod = sts["spec"]["template"]
    if not re.fullmatch(r"[0-9a-f]{64}", pod["metadata"].get("annotations", {}).get("checksum/config", "")):
        fail("the pod template has no checksum/config annotation")
    spec = pod["spec"]
    psc = spec["securityContext"]
    if not (psc.get("runAsNonRoot") and psc.get("fsGroup") and
            psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
        fail("pod securityContext needs runAsNonRoot, fsGroup, seccompProfile RuntimeDefault")
    containers = {c["name"]: c for c in spec["containers"]}
    if set(containers) != {"postgres", "pgmm"}:
        fail(f"containers {sorted(containers)}, expected postgres and pgmm")
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("allowPrivilegeEscalation") is not False:
            fail(f"container {c['name']} must drop ALL capabilities and disallow privilege escalation")
    pg = containers["postgres"]
    args = " ".join(pg.get("args", []))
    for setting in ("wal_level=logical", "track_commit_timestamp=on", "max_replication_slots=",
                    "max_wal_senders=", "listen_addresses=127.0.0.1"):
        if setting not in args:
            fail(f"postgres is not started with {setting}")
    slots = int(re.search(r"max_replication_slots=(\d+)", args).group(1))
    if slots < replicas - 1:
        fail(f"max_replication_slots={slots} is less than the {replicas - 1} peers")
    if pg["securityContext"].get("runAsUser") != 999:
        fail("postgres must run as user 999")
    # PGDATA set explicitly, below the data volume: the official images' own default differs by
    # major (18: /var/lib/postgresql/18/docker), and a data directory off the volume is lost.
    pgdata = next((e.get("value") for e in pg.get("env", []) if e["name"] == "PGDATA"), None)
    data_mount = next((m["mountPath"] for m in pg.get("volumeMounts", []) if m["name"] == "data"), None)
    if not pgdata or not data_mount or not pgdata.startswith(data_mount.rstrip("/") + "/"):
        fail(f"postgres needs PGDATA ({pgdata}) in a subdirectory of the data volume ({data_mount})")
    pgmm = containers["pgmm"]
    if pgmm["command"] != ["pgmm", "serve", "--config", "/etc/pgmm/pgmm.toml"]:
        fail(f"pgmm command is {pgmm['command']}")
    if pgmm["livenessProbe"]["httpGet"]["path"] != "/healthz" or pgmm["readinessProbe"]["httpGet"]["path"] != "/readyz?peers=ignore":
        fail("pgmm needs liveness on /healthz and readiness on /readyz?peers=ignore")
    ports = {p["name"]: p["containerPort"] for p in pgmm["ports"]}
    if client["spec"]["ports"][0]["port"] != 5432 or client["spec"]["ports"][0]["targetPort"] != "client":
        fail("the client Service must map 5432 to pgmm's client port")

    cms = [d for d in docs if d["kind"] == "ConfigMap" and any(k.endswith(".toml") for k in (d.get("data") or {}))]
    if len(cms) != 1:
        fail(f"expected one ConfigMap of node configs, found {len(cms)}")
    data = cms[0]["data"]
    if sorted(data) != sorted(f"node-{i}.toml" for i in range(replicas)):
        fail(f"ConfigMap keys {sorted(data)}, expected node-0.toml .. node-{replicas - 1}.toml")
    if tomllib is None:
        print("  (Python has no tomllib: node config contents not checked)")
        return
    configs = [tomllib.loads(data[f"node-{i}.toml"]) for i in range(replicas)]
    names = [c["node"]["name"] for c in configs]
    if len(set(names)) != replicas or not all(re.fullmatch(r"[a-z0-9_]{1,58}", n) for n in names):
        fail(f"node names {names} must be distinct, [a-z0-9_]+, at most 58 characters")
    for i, c in enumerate(configs):
        if c["cluster"]["nodes"] != names:
            fail(f"node-{i}.toml: [cluster] nodes {c['cluster']['nodes']} differs from {names}")
        peers = c.get("peers", [])
        want = [(names[j], f"{fullname}-{j}.{headless['metadata']['name']}.{ns}.svc.cluster.local:{ports['peer']}")
                for j in range(replicas) if j != i]
        if [(p["name"], p["address"]) for p in peers] != want:
            fail(f"node-{i}.toml: [[peers]] {peers}, expected {want}")
        if c["client"]["listen"] != f"0.0.0.0:{ports['client']}" or c["metrics"]["listen"] != f"0.0.0.0:{ports['metrics']}" \
                or c["peer"]["listen"] != f"0.0.0.0:{ports['peer']}":
            fail(f"node-{i}.toml: listen addresses do not match the container ports {ports}")
        if not c["postgres"]["url"].startswith("postgres://postgres:__PGMM_POSTGRES_PASSWORD__@127.0.0.1:5432/"):
            fail(f"node-{i}.toml: [postgres] url {c['postgres']['url']}")
        want_join = None if donor == "none" or i == int(donor) else names[int(donor)]
        if c["node"].get("join_from") != want_join:
            fail(f"node-{i}.toml: [node] join_from {c['node'].get('join_from')!r}, expected {want_join!r}")
        for rule in c.get("ownership", []):
            if sum(k in rule for k in ("owner", "owner_column", "owner_key")) != 1:
                fail(f"node-{i}.toml: ownership rule {rule} needs exactly one owner kind")
    print(f"  ok: {replicas} node configs ({', '.join(names)}), peers through {headless['metadata']['name']}, "
          f"probes, security contexts, {slots} replication slots, join_from {'off' if donor == 'none' else 'node ' + names[int(donor)]}")


def expect_rules(rules, *pairs):
    groups = yaml.safe_load(Path(rules).read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    for pair in pairs:
        name, _, want = pair.partition("=")
        if name not in alerts:
            fail(f"no alert {name} in {rules}")
        text = f"{alerts[name]['expr']} for {alerts[name].get('for', '')}"
        if want not in text:
            fail(f"alert {name}: {text!r} does not contain {want!r}")
    print(f"  ok: thresholds substituted ({', '.join(pairs)})")


METRICS = ["pgmm_replication_lag_seconds", "pgmm_replication_lag_bytes", "pgmm_changes_captured_total",
           "pgmm_changes_shipped_total", "pgmm_changes_applied_total", "pgmm_conflicts_total",
           "pgmm_ownership_rejections_total", "pgmm_peer_up", "pgmm_slot_retained_wal_bytes",
           "pgmm_slot_invalidated", "pgmm_apply_stalled",
           "pgmm_client_connections"]


def dashboard(path):
    try:
        dash = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    missing = [m for m in METRICS if not any(m in e for e in exprs)]
    if missing:
        fail(f"dashboard has no panel for {missing}")
    print(f"  ok: dashboard {dash['title']!r}: {len(dash['panels'])} panels, all {len(METRICS)} metrics shown")


if __name__ == "__main__":
    commands = {"split": split, "check": check, "expect-rules": expect_rules, "dashboard": dashboard}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        fail(f"usage: {sys.argv[0]} {'|'.join(commands)} ARGS...")
    commands[sys.argv[1]](*sys.argv[2:])
