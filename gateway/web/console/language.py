"""The console's words, in French (the default: the gateway serves French hospitals) and in
English, chosen by the request's ``Accept-Language`` (RFC 9110 12.5.4)."""

from collections.abc import Callable

DEFAULT = "fr"

_WORDS: dict[str, dict[str, str]] = {
    "fr": {
        "console": "Console Passerelle", "studies": "Examens", "outbox": "Publications",
        "health": "État du service", "search": "Rechercher", "patient_name": "Patient",
        "patient_id": "IPP", "accession": "N° d'accession", "date_from": "Du",
        "date_to": "Au", "modality": "Modalité", "study_date": "Date", "modalities":
        "Modalités", "series": "Séries", "instances": "Images", "size": "Taille",
        "received": "Reçu", "publication": "Publication", "none": "aucune",
        "found": "{count} examen(s)", "previous": "Précédents", "next": "Suivants",
        "page": "page {page} sur {pages}", "study": "Examen", "description": "Description",
        "number": "N°", "first_received": "Premier reçu", "last_received": "Dernier reçu",
        "history": "Historique des publications", "action": "Action", "state": "État",
        "attempts": "Tentatives", "updated": "Mis à jour", "registry_answer":
        "Réponse du registre", "document": "DocumentReference", "actions": "Actions",
        "images": "Images", "view": "Voir", "open_viewer": "Ouvrir dans le visualiseur",
        "publish": "Publier maintenant", "unpublish": "Retirer du DMP",
        "confidentiality": "Changer la confidentialité", "retry": "Relancer",
        "confirm": "Confirmer", "cancel": "Annuler",
        "confirm_publish": "Publier le manifeste de cet examen maintenant ?",
        "confirm_unpublish": "Retirer le document de cet examen du registre ?",
        "confirm_confidentiality": "Appliquer ce niveau de confidentialité à cet examen ?",
        "confirm_retry": "Renvoyer cette publication refusée ?",
        "level": "Niveau", "level_N": "N : normal", "level_R": "R : restreint",
        "level_V": "V : très restreint", "done": "Demande enregistrée : {what}.",
        "no_study": "Aucun examen ne correspond.", "no_publication": "Aucune publication.",
        "pending": "En attente", "sent": "Envoyée", "acknowledged": "Acquittée",
        "failed": "Refusée", "action_publish": "publication", "action_unpublish": "retrait",
        "action_confidentiality": "confidentialité", "dicom": "Réception DICOM",
        "registry": "Registre", "queue": "File d'attente", "oldest": "Plus ancienne en attente",
        "disk": "Espace disque libre", "up": "en service", "down": "arrêté",
        "reachable": "joignable", "answers_error": "répond en erreur",
        "unreachable": "injoignable", "not_configured":
        "non configuré (les manifestes attendent)", "processes": "processus",
        "ago": "il y a {age}", "unknown_study": "Examen inconnu : {uid}",
        "refused": "Refusé : {why}", "seen_by": "Consulté par", "user": "Utilisateur",
        "address": "Adresse", "accesses": "Accès", "first_access": "Premier accès",
        "last_access": "Dernier accès", "last_kind": "Dernier type d'accès",
        "refused_accesses": "Refusés ou en échec", "kind_query": "recherche",
        "kind_retrieve": "récupération", "kind_access": "consultation",
        "anonymous": "anonyme (sans authentification)", "no_access": "Aucun accès enregistré.",
        "seen_by_json": "{shown} sur {total} (tous, en JSON)",
        "registry_probe": "Registre, sondé en direct", "checked": "vérifié le {when}",
        "signed_in_as": "Connecté : {name}", "sign_out": "Se déconnecter",
        "sign_in": "Se connecter", "signed_out": "Vous êtes déconnecté.",
        "sign_in_failed": "Connexion impossible : {why}",
    },
    "en": {
        "console": "Passerelle console", "studies": "Studies", "outbox": "Publications",
        "health": "Service health", "search": "Search", "patient_name": "Patient",
        "patient_id": "Patient ID", "accession": "Accession number", "date_from": "From",
        "date_to": "To", "modality": "Modality", "study_date": "Date", "modalities":
        "Modalities", "series": "Series", "instances": "Instances", "size": "Size",
        "received": "Received", "publication": "Publication", "none": "none",
        "found": "{count} study(ies)", "previous": "Previous", "next": "Next",
        "page": "page {page} of {pages}", "study": "Study", "description": "Description",
        "number": "No.", "first_received": "First received", "last_received":
        "Last received", "history": "Publication history", "action": "Action",
        "state": "State", "attempts": "Attempts", "updated": "Updated", "registry_answer":
        "Registry's answer", "document": "DocumentReference", "actions": "Actions",
        "images": "Images", "view": "View", "open_viewer": "Open in the viewer",
        "publish": "Publish now", "unpublish": "Withdraw", "confidentiality":
        "Change confidentiality", "retry": "Retry", "confirm": "Confirm", "cancel": "Cancel",
        "confirm_publish": "Publish this study's manifest now?",
        "confirm_unpublish": "Withdraw this study's document from the registry?",
        "confirm_confidentiality": "Apply this confidentiality level to this study?",
        "confirm_retry": "Send this refused publication again?",
        "level": "Level", "level_N": "N: normal", "level_R": "R: restricted",
        "level_V": "V: very restricted", "done": "Request recorded: {what}.",
        "no_study": "No study matches.", "no_publication": "No publication.",
        "pending": "Pending", "sent": "Sent", "acknowledged": "Acknowledged",
        "failed": "Refused", "action_publish": "publish", "action_unpublish": "withdraw",
        "action_confidentiality": "confidentiality", "dicom": "DICOM reception",
        "registry": "Registry", "queue": "Queue", "oldest": "Oldest pending",
        "disk": "Free disk space", "up": "serving", "down": "down",
        "reachable": "reachable", "unreachable": "unreachable", "not_configured":
        "not configured (manifests wait)", "processes": "process(es)",
        "ago": "{age} ago", "unknown_study": "Unknown study: {uid}",
        "refused": "Refused: {why}", "seen_by": "Seen by", "user": "User",
        "address": "Address", "accesses": "Accesses", "first_access": "First access",
        "last_access": "Last access", "last_kind": "Last kind of access",
        "refused_accesses": "Refused or failed", "kind_query": "query",
        "kind_retrieve": "retrieve", "kind_access": "view",
        "anonymous": "anonymous (no authentication)", "no_access": "No access recorded.",
        "seen_by_json": "{shown} of {total} (all, as JSON)",
        "registry_probe": "Registry, probed live", "answers_error": "answers with an error",
        "checked": "checked {when}",
        "signed_in_as": "Signed in: {name}", "sign_out": "Sign out",
        "sign_in": "Sign in", "signed_out": "You are signed out.",
        "sign_in_failed": "Sign-in failed: {why}",
    },
}
LANGUAGES = tuple(_WORDS)


def negotiate(accept_language: str) -> str:
    """The language of ``LANGUAGES`` the header prefers (q-values; a region is ignored:
    en-GB is en), DEFAULT when it names none of them."""
    best, best_q = DEFAULT, 0.0
    for position, part in enumerate(accept_language.split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        language = tag.strip().split("-")[0].lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        q -= position * 1e-6  # equal q: the first named wins
        if language in _WORDS and q > best_q:
            best, best_q = language, q
    return best


def words(language: str) -> Callable[..., str]:
    """``t(key, **values)``: the text of ``key`` in ``language``, its fields filled."""
    table = _WORDS[language]

    def t(key: str, **values: object) -> str:
        return table[key].format(**values) if values else table[key]

    return t
