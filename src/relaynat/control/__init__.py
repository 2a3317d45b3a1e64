"""The control socket (server) and `relaynat ctl` (client)."""
