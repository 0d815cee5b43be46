"""The roles: thin ``async for`` loops that decode, call the core, and send."""
