"""Allow ``python -m hapsms_relay``."""

from hapsms_relay.cli import main

raise SystemExit(main())
