"""Text for one-line messages."""


def one_line(text):
    """`text` with its line breaks (and the blanks around them) made single spaces."""
    text = str(text)
    return " ".join(text.split()) if "\n" in text or "\r" in text else text
