"""Every private API of torch / transformers / accelerate / datasets / DeepSpeed that peftkit
relies on still behaves as it expects (src/peftkit/_private_apis.py), and none is used unlisted."""
import re
from pathlib import Path

import pytest

from peftkit import _private_apis
from peftkit._private_apis import APIS, PrivateAPI, PrivateAPIChanged, check, installed_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("api", APIS, ids=[api.name for api in APIS])
def test_private_api_still_behaves_as_relied_on(api):
    if api.optional and installed_version(api.library) is None:
        pytest.skip(f"{api.library} is not installed")
    try:
        check(api)
    except PrivateAPIChanged as exc:
        pytest.fail(str(exc), pytrace=False)


def test_a_failing_check_names_the_api_the_version_and_the_call_sites():
    def broken():
        raise AttributeError("module 'torch' has no attribute '_gone'")

    api = PrivateAPI("torch._gone", "torch", "something", ("src/peftkit/x.py",), broken)
    with pytest.raises(PrivateAPIChanged) as info:
        check(api)
    message = str(info.value)
    assert message.startswith(f"torch._gone (torch {installed_version('torch')}) changed: AttributeError")
    assert "Used in: src/peftkit/x.py" in message


def test_every_listed_call_site_exists():
    for api in APIS:
        for where in api.used_in:
            assert (ROOT / where.split(" ")[0]).exists(), f"{api.name}: {where} does not exist"


_DOTTED_PRIVATE = re.compile(r"\b(?:torch|transformers|accelerate|datasets|deepspeed)(?:\.[A-Za-z]\w*)*\.(?:_[a-z]\w*)")


def test_no_dotted_private_name_is_used_unlisted():
    listed = " ".join(f"{api.name} {api.what}" for api in APIS)
    unlisted = []
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")):
        if path.name == "_private_apis.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            unlisted += [f"{path.relative_to(ROOT)}:{number}: {name}"
                         for name in _DOTTED_PRIVATE.findall(line) if name not in listed]
    assert not unlisted, "private APIs used but not listed in src/peftkit/_private_apis.py:\n" + "\n".join(unlisted)


def test_check_all_reports_nothing_on_the_installed_versions():
    assert _private_apis.check_all() == []
