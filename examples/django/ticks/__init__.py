"""The demo's Django app: the tick task and the command that schedules it."""
