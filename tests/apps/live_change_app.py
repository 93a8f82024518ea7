"""One table, several versions of its pipeline: the graphs a live change goes between.

``before`` is a→c and ``after`` is a→b→c, with handlers that take a little time so that
rows are mid-chain when the workers stop; ``three`` (a→b→c), ``two`` (a→c) and ``renamed``
(a→b2→c) are for removal and renaming.
"""

from __future__ import annotations

from typing import Any

import anyio

from pgstagechain import Pipeline

TABLE = """
CREATE TABLE parcels (
    id bigint PRIMARY KEY,
    step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
)
"""

#: seconds each stage's handler takes in ``before`` and ``after``
PACE = {"a": 0.01, "b": 0.01, "c": 0.04}


def chain(*names: str) -> Pipeline:
    """The pipeline whose stages follow each other in ``names`` from the start step ``new``;
    each handler waits its pace and returns its stage's name and the row's key."""
    made = Pipeline("parcels", table="parcels", key="id", step_column="step", start="new")
    after = "new"
    for name in names:

        async def handler(ctx: Any, name: str = name) -> dict[str, Any]:
            await anyio.sleep(PACE.get(name, 0))
            return {"stage": name, "key": ctx.key}

        made.stage(after=after, name=name)(handler)
        after = name
    return made


before = chain("a", "c")
after = chain("a", "b", "c")
three = chain("a", "b", "c")
two = chain("a", "c")
renamed = chain("a", "b2", "c")
