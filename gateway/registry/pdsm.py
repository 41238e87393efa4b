"""The codes, canonical URLs and value sets the local registry checks, written from the public
texts (PDSm IG ``ans.fhir.fr.pdsm`` 3.1.1, https://interop.esante.gouv.fr/ig/fhir/pdsm; IHE
MHD 4.2.3, https://profiles.ihe.net/ITI/MHD; the ANS terminologies, https://mos.esante.gouv.fr/NOS)
and not imported from Passerelle's publishing code: the registry checks what Passerelle
sends, so a wrong constant there must not be right here too.

The PDSm profiles cited below are also vendored under tests/data/pdsm/profiles/, where
tests/test_registry.py reads the patterns and extension URLs given here and checks them.
"""

NOS = "https://mos.esante.gouv.fr/NOS/"

# MHD 4.2.3 identifiers (IHE.MHD.UniqueIdIdentifier, SubmissionSetUniqueIdIdentifier,
# EntryUUID.Identifier): system urn:ietf:rfc:3986, value urn:oid:... or urn:uuid:...
URI = "urn:ietf:rfc:3986"

# PDSm ITI-65 page / pdsm-comprehensive-provide-document-bundle: Bundle.meta.profile 1..*.
BUNDLE_PROFILE = ("https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/"
                  "pdsm-comprehensive-provide-document-bundle")

# pdsm-submissionset-comprehensive: List.extension:designationType and :sourceId, 1..1 each.
MHD_EXTENSIONS = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/"
DESIGNATION_TYPE = f"{MHD_EXTENSIONS}ihe-designationType"
SOURCE_ID = f"{MHD_EXTENSIONS}ihe-sourceId"

# pdsm-submissionset-comprehensive: List.status and List.mode patterns, List.code pattern
# MHDlistTypes#submissionset; the CodeSystem's display of that code.
SUBMISSION_SET_STATUS = "current"
SUBMISSION_SET_MODE = "working"
LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"
SUBMISSION_SET_CODE = "submissionset"
SUBMISSION_SET_DISPLAY = "SubmissionSet as a FHIR List"

# pdsm-comprehensive-document-reference: DocumentReference.status, required binding to MHD
# ValueSet DocumentReferenceStats (no entered-in-error).
DOCUMENT_STATUSES = frozenset({"current", "superseded"})

# DocumentReference.securityLabel, extensible binding JDV_J08-XdsConfidentialityCode-CISIS:
# the confidentiality level in TRE_A08-HL7Confidentiality (= HL7 v3 Confidentiality,
# 2.16.840.1.113883.5.25) and the visibility codes of TRE_A07-StatutVisibiliteDocument
# (1.2.250.1.213.1.1.4.13).
CONFIDENTIALITY = {
    f"{NOS}TRE_A08-HL7Confidentiality/FHIR/TRE-A08-HL7Confidentiality": {"N", "R", "V"},
    "http://terminology.hl7.org/CodeSystem/v3-Confidentiality": {"N", "R", "V"},
}
VISIBILITY = {
    f"{NOS}TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument": {
        "MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX", "MASQUE_PSOCIAL",
        "MASQUE_PT"},
}

# A KOS manifest (CI-SIS imaging volet; the national DRIM-M sample submission uses exactly
# these): category TRE_A03-ClasseDocument (1.2.250.1.213.1.1.4.1, JDV_J06) "31"; type
# TRE_A05-TypeDocComplementaire (1.2.250.1.213.1.1.4.12, JDV_J07) "IMG-KOS" (LOINC 18748-4
# is the imaging report); format TRE_A09-DICOMuidRegistry (1.2.840.10008.2.6.1, JDV_J10), the
# Key Object Selection SOP Class UID (the urn:ihe:rad:... form is deprecated in TRE_A09);
# content type application/dicom.
KOS_CATEGORY = (f"{NOS}TRE_A03-ClasseDocument/FHIR/TRE-A03-ClasseDocument", "31")
KOS_TYPE = (f"{NOS}TRE_A05-TypeDocComplementaire/FHIR/TRE-A05-TypeDocComplementaire", "IMG-KOS")
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_FORMAT = (f"{NOS}TRE_A09-DICOMuidRegistry/FHIR/TRE-A09-DICOMuidRegistry", KOS_SOP_CLASS)
DICOM_MEDIA_TYPE = "application/dicom"

# context.event of a KOS (CI-SIS imaging volet): acquisition modalities in the DICOM code
# system (JDV_ModaliteAcquisition-CISIS), anatomic regions in SNOMED CT
# (JDV_RegionAnatomique-CISIS).
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"

# pdsm-comprehensive-document-reference: context.related:referenceIdList, identifier.type
# coding system pattern urn:ietf:rfc:3986, codes of TRE_R342 / JDV_J231 (a KOS names its
# accession and its study).
ACCESSION = "urn:ihe:iti:xds:2013:accession"
STUDY_INSTANCE_UID = "urn:ihe:iti:xds:2016:studyInstanceUID"
ORDER = "urn:ihe:iti:xds:2013:order"
# Identifiers of the slice that need their assigning authority (identifier.system: "absent
# notably for studyInstanceUID" in the profile; XDS CXi.4).
SCOPED_REFERENCE_IDS = frozenset({ACCESSION, ORDER})

# IHE.MHD.Patch.Parameters (ITI-65 UpdateDocumentRefs): the one patch a replacement carries.
SUPERSEDE_PATH = "DocumentReference.status"
