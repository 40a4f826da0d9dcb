#!/usr/bin/env python3
"""Validate docker-compose.yml (and docker-compose.cluster.yml, laid over it)
against the Compose specification.

The schema is the one the pinned `check-jsonschema` package ships (a vendored
copy of compose-spec/compose-go's). What the file contains is generated from
the service roster and checked by the `stack` crate's tests; this checks only
that Compose itself would accept it. Duplicate keys are refused, as
`docker compose` refuses them.

    .venv/bin/python scripts/check-compose.py [FILE...]   (default: both)
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=True) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise yaml.YAMLError(f"duplicate keys {sorted(map(str, dupes))} at line {node.start_mark.line + 1}")
        return super().construct_mapping(node, deep=deep)


def main(path: Path) -> int:
    dist = importlib.metadata.distribution("check-jsonschema")
    schema_file = next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(SCHEMA))
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors:
        print(f"FAIL {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}")
    print(f"{path.name}: {'valid' if not errors else f'{len(errors)} errors'} (Compose specification, check-jsonschema {dist.version})")
    return 1 if errors else 0


if __name__ == "__main__":
    files = [Path(a) for a in sys.argv[1:]] or [ROOT / "docker-compose.yml", ROOT / "docker-compose.cluster.yml"]
    sys.exit(max(main(f) for f in files))
