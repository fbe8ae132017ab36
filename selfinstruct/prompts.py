"""Render the Jinja prompt templates in prompts/ inside a sandbox.

    text = render("self_instruct/instructions.jinja", instructions=[...])

Templates run in Jinja's immutable sandbox with StrictUndefined: a template cannot reach Python
internals, and a variable it names but is not given is an error, not an empty string.
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


@cache
def _env(root: Path) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        autoescape=False,
    )


def render(name: str, root: Path = PROMPTS_DIR, **variables: Any) -> str:
    """Render template `name` (a path under `root`) with `variables`."""
    try:
        return _env(root).get_template(name).render(**variables)
    except jinja2.TemplateNotFound:
        raise UserError(f"prompt template '{name}' not found", root) from None
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"template syntax error: {e.message}", e.filename or root / name, e.lineno) from None
    except jinja2.UndefinedError as e:
        raise UserError(f"template uses an undefined variable: {e.message}", root / name) from None
    except SecurityError as e:
        raise UserError(f"template tried something unsafe, refused by the sandbox: {e}", root / name) from None


def template_id(name: str, root: Path = PROMPTS_DIR) -> str:
    """`name@hash` of the template's bytes, recorded on every record it produced."""
    data = (root / name).read_bytes()
    return f"{name}@{hashlib.sha256(data).hexdigest()[:10]}"
