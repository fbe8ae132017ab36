"""Render the Jinja prompt templates in prompts/ inside a sandbox.

    text = render("self_instruct/instructions.jinja", instructions=[...])

Templates run in Jinja's immutable sandbox with StrictUndefined: a template cannot reach Python
internals, and a variable it names but is not given is an error, not an empty string. Users may
replace any template with their own (generate.prompts_dir, same relative names); every template a
run uses is rendered once with sample values at start-up (check_templates), so mistakes fail early.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from selfinstruct.errors import UserError

_HERE = Path(__file__).resolve().parent
# A wheel carries the templates inside the package; a source checkout keeps them at the top.
PROMPTS_DIR = _HERE / "prompts" if (_HERE / "prompts").is_dir() else _HERE.parent / "prompts"


_USER_DIRS: list[Path] = []  # the user's own templates, looked up before ours (generate.prompts_dir)


def use_prompts_dir(path: str | Path | None) -> None:
    """Look up every template in `path` first (the user's versions, same relative names), then in ours."""
    if path is not None and not Path(path).is_dir():
        raise UserError("generate.prompts_dir is not a directory", path)
    _USER_DIRS[:] = [Path(path).resolve()] if path is not None else []


def _roots(root: Path) -> tuple[Path, ...]:
    return (*_USER_DIRS, root) if root == PROMPTS_DIR else (root,)


def template_file(name: str, root: Path = PROMPTS_DIR) -> Path:
    """The file `name` resolves to (the user's version when there is one)."""
    for r in _roots(root):
        if (r / name).is_file():
            return r / name
    raise UserError(f"prompt template '{name}' not found", root)


@cache
def _env(roots: tuple[Path, ...]) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(list(roots)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        autoescape=False,
    )


def render(name: str, root: Path = PROMPTS_DIR, **variables: Any) -> str:
    """Render template `name` (a path under `root`) with `variables`."""
    try:
        return _env(_roots(root)).get_template(name).render(**variables)
    except jinja2.TemplateNotFound:
        raise UserError(f"prompt template '{name}' not found", root) from None
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"template syntax error: {e.message}", e.filename or root / name, e.lineno) from None
    except jinja2.UndefinedError as e:
        raise UserError(f"template uses an undefined variable: {e.message}", template_file(name, root)) from None
    except SecurityError as e:
        raise UserError(f"template tried something unsafe, refused by the sandbox: {e}",
                        template_file(name, root)) from None


def check_templates(samples: dict[str, dict[str, Any]]) -> None:
    """Render each template once with sample variables, so a template that names a variable it is not
    given (or does not parse, or renders to nothing) fails at start-up, not hours into a run."""
    for name, variables in samples.items():
        if not render(name, **variables).strip():
            raise UserError("template renders to an empty prompt", template_file(name))


def template_id(name: str, root: Path = PROMPTS_DIR) -> str:
    """`name@hash` of the template's bytes, recorded on every record it produced."""
    data = template_file(name, root).read_bytes()
    return f"{name}@{hashlib.sha256(data).hexdigest()[:10]}"
