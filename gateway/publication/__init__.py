"""From a stable study to a published manifest: stable-study watcher, KOS, event codes, MHD
resources, registry client and the outbox publisher."""
