"""The HTTP side: the starlette application (``app``), DICOMweb resources (``dicomweb``),
HTTP plumbing (``http``), middleware (``middleware``) and the admin API."""
