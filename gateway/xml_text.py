"""Text of outside origin written into XML 1.0: the characters XML cannot carry replaced,
markup escaped, so that what is written is well-formed and reads back as it was."""

import re
from xml.sax.saxutils import escape

# Characters XML 1.0 cannot carry, not even as references (XML 1.0 2.2): a DICOM text
# value holding one (a stray control code, U+FFFE, U+FFFF) gets U+FFFD in their place.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# A CR in text would be read back as LF (XML 1.0 2.11); in an attribute, white space as a
# space (3.3.3): as references, they stay what they are.
_TEXT_ENTITIES = {"\r": "&#13;"}
_ATTRIBUTE_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}


def xml_characters(value: str) -> str:
    """``value`` with U+FFFD in place of each character XML 1.0 cannot carry."""
    return _NOT_XML.sub("\ufffd", value)


def xml_text(value: str) -> str:
    """``value`` as the character data of an element."""
    return escape(xml_characters(value), _TEXT_ENTITIES)


def xml_attribute(value: str) -> str:
    """``value`` as an attribute value between double quotes."""
    return escape(xml_characters(value), _ATTRIBUTE_ENTITIES)
