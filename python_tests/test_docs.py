"""The documentation in docs/ cannot drift from the code: every signature line of docs/api.md is
compared with inspect.signature of the object it names, every public name is documented, and
every relative link of the docs and README points at a file that exists."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import segkd_kernels as sk

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SIGNATURE = re.compile(r"^(sk(?:\.\w+)+)\((.*)\)\s*$")


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def documented_signatures() -> dict[str, str]:
    """'sk.x.y' -> the text between the parentheses, from the python blocks of docs/api.md."""
    out = {}
    for block in code_blocks((DOCS / "api.md").read_text(), "python"):
        for line in block.splitlines():
            m = SIGNATURE.match(line.strip())
            if m:
                assert m.group(1) not in out, f"{m.group(1)} documented twice"
                out[m.group(1)] = m.group(2)
    return out


def resolve(dotted: str):
    obj = sk
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def parse_params(params: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a documented parameter list, by parsing `def f(<params>): ...`."""
    fn = ast.parse(f"def f({params}): pass").body[0]
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD", default))
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


def actual_params(obj) -> list[tuple[str, str, object]]:
    sig = inspect.signature(obj)
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


SIGNATURES = documented_signatures()


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_documented_signature_matches_the_code(name):
    obj = resolve(name)
    assert parse_params(SIGNATURES[name]) == actual_params(obj), (
        f"docs/api.md documents {name}({SIGNATURES[name]}) but the code has {name}{inspect.signature(obj)}")


def test_every_public_name_is_documented():
    api = (DOCS / "api.md").read_text()
    for name in sk.__all__:
        obj = getattr(sk, name)
        if inspect.isfunction(obj):
            assert f"sk.{name}" in SIGNATURES, f"sk.{name} has no signature line in docs/api.md"
        else:
            assert f"sk.{name}" in api, f"sk.{name} is not mentioned in docs/api.md"
    for name in sk.nn.__all__:
        cls = getattr(sk.nn, name)
        assert f"sk.nn.{name}" in SIGNATURES, f"sk.nn.{name} has no signature line in docs/api.md"
        for method, value in vars(cls).items():
            if inspect.isfunction(value) and not method.startswith("_") and method != "extra_repr":
                assert f"sk.nn.{name}.{method}" in SIGNATURES, f"sk.nn.{name}.{method} is not documented"


def test_every_public_op_has_a_section_in_losses_md():
    losses = (DOCS / "losses.md").read_text()
    for name in sk.__all__:
        if inspect.isfunction(getattr(sk, name)) and name != "available_backends":
            assert f"`{name}" in losses, f"docs/losses.md does not describe {name}"


def test_documented_defaults_appear_in_losses_md():
    """The defaults losses.md quotes for temperatures are the code's."""
    losses = (DOCS / "losses.md").read_text()
    for fn in (sk.channel_wise_kd, sk.pixel_kd, sk.cross_image_kd):
        tau = inspect.signature(fn).parameters["tau"].default
        assert f"Default `tau = {tau}`" in losses, fn.__name__


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_relative_links_resolve(page):
    path = (DOCS / page).resolve()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_readme_points_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/losses.md", "docs/api.md", "docs/backends.md", "docs/conventions.md"):
        assert f"]({page})" in readme, f"README.md does not link {page}"
    # the contract files the README used to name are not part of the repository
    assert "LOSSES.md" not in readme and "API.md" not in readme
