"""HTTP plumbing shared by the resources: Accept negotiation, multipart, responses, the
guarded uvicorn protocol and the TLS client identity."""
