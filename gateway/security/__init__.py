"""TLS contexts, per-client limits, the audit trail and its syslog export."""
