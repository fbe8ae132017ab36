"""Render the Jinja prompt templates in prompts/ inside a sandbox.

    prompts = Prompts(cfg.generate.prompts_dir)     # the user's templates first, then ours
    text = prompts.render("self_instruct/instructions.jinja", instructions=[...])

Templates run in Jinja's immutable sandbox with StrictUndefined: a template cannot reach Python
internals, and a variable it names but is not given is an error, not an empty string. Users may
replace any template with their own (generate.prompts_dir, same relative names); every template a
run uses is rendered once with sample values at start-up (Prompts.check), so mistakes fail early.
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


class Prompts:
    """The templates a run renders: the user's directory (generate.prompts_dir; same relative names) looked
    up first, then ours. Passed to whatever renders, never global.

        prompts = Prompts(cfg.generate.prompts_dir)
        prompts.check(samples)                      # every template renders once, at start-up
        text = prompts.render("evol/deepen.jinja", instruction="...")
    """

    def __init__(self, user_dir: str | Path | None = None):
        if user_dir is not None and not Path(user_dir).is_dir():
            raise UserError("generate.prompts_dir is not a directory", user_dir)
        self.roots = (Path(user_dir).resolve(), PROMPTS_DIR) if user_dir is not None else (PROMPTS_DIR,)

    def file(self, name: str) -> Path:
        """The file `name` resolves to (the user's version when there is one)."""
        for r in self.roots:
            if (r / name).is_file():
                return r / name
        raise UserError(f"prompt template '{name}' not found", self.roots[-1])

    def render(self, name: str, **variables: Any) -> str:
        """Render template `name` with `variables`."""
        try:
            return _env(self.roots).get_template(name).render(**variables)
        except jinja2.TemplateNotFound:
            raise UserError(f"prompt template '{name}' not found", self.roots[-1]) from None
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"template syntax error: {e.message}", e.filename or self.roots[-1] / name,
                            e.lineno) from None
        except jinja2.UndefinedError as e:
            raise UserError(f"template uses an undefined variable: {e.message}", self.file(name)) from None
        except SecurityError as e:
            raise UserError(f"template tried something unsafe, refused by the sandbox: {e}", self.file(name)) from None

    def check(self, samples: dict[str, dict[str, Any]]) -> None:
        """Render each template once with sample variables, so a template that names a variable it is not
        given (or does not parse, or renders to nothing) fails at start-up, not hours into a run."""
        for name, variables in samples.items():
            if not self.render(name, **variables).strip():
                raise UserError("template renders to an empty prompt", self.file(name))

    def template_id(self, name: str) -> str:
        """`name@hash` of the template's bytes, recorded on every record it produced."""
        return f"{name}@{hashlib.sha256(self.file(name).read_bytes()).hexdigest()[:10]}"


@cache
def _env(roots: tuple[Path, ...]) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(list(roots)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        autoescape=False,
    )


OURS = Prompts()  # our templates only


def render(name: str, **variables: Any) -> str:
    """Render one of our templates (a user's directory goes through a `Prompts` of its own)."""
    return OURS.render(name, **variables)


def template_id(name: str) -> str:
    """The id of one of our templates (see Prompts.template_id)."""
    return OURS.template_id(name)
