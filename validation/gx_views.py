"""The Data Docs page view, with its templates compiled once per process.

great-expectations builds a new jinja Environment for every page it renders, so every gate compiled all of the
page's templates again: about 95% of the time a page took (0.15-0.3 s of each gate on 2 cores). Compiled
templates are kept here, keyed by jinja on each template's name and source checksum, so a changed template is
compiled again. GX imports this module from the site's config (validation/data_docs.py `docs_context`).
"""

from __future__ import annotations

from typing import Any

from great_expectations.render.view import DefaultJinjaPageView
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket


class InProcessBytecode(BytecodeCache):
    def __init__(self) -> None:
        self.codes: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        code = self.codes.get(bucket.key)
        if code is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self.codes[bucket.key] = bucket.bytecode_to_string()


COMPILED = InProcessBytecode()


class CompiledOncePageView(DefaultJinjaPageView):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = COMPILED
