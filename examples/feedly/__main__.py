"""``python -m examples.feedly``: the Feedly showcase (see :mod:`examples.feedly.app`)."""

from .app import main

raise SystemExit(main())
