"""Passerelle's protocols and service, by layer: ``dicom`` (DIMSE), ``imaging`` (pixels),
``publication`` (KOS to the registry), ``security`` (TLS, tokens, limits, audit), ``web``
(DICOMweb and the admin API), ``registry`` (the local registry stand-in); ``service``
composes them, ``cli`` is the command line, ``config`` the settings."""
