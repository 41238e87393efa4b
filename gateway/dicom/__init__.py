"""DICOM networking: the association server, the C-ECHO/C-STORE SCP and its statuses."""
