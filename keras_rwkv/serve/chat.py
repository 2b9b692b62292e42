"""The RWKV World chat format, and stop strings in a stream of text.

A conversation is read as

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}\\n\\n...
    User: {user}\\n\\nAssistant:

the format the World models were tuned on (ChatRWKV's). "\\n\\n" ends a
turn, so blank lines inside a message become single newlines, and a reply
stops at the first "\\n\\n". Each message is tokenized on its own (its
ids do not depend on what follows), so the ids of a conversation's first
turns are the same in every later request: the state cache finds them.
"""

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
REPLY_PREFIX = "Assistant:"
TURN_END = "\n\n"


def _clean(text):
    text = text.strip()
    while TURN_END in text:
        text = text.replace(TURN_END, "\n")
    return text


def message_text(role, content):
    """One message as the model reads it."""
    return f"{ROLE_NAMES[role]}: {_clean(content)}{TURN_END}"


def reply_text(reply):
    """A finished reply as the next request will send it back."""
    return message_text("assistant", reply)


def conversation_segments(messages):
    """The texts the prompt is read in: one per message, then the reply
    prefix."""
    return [message_text(role, content) for role, content in messages] + [
        REPLY_PREFIX
    ]


def clean_reply(text):
    """What the client gets: the generated text (the turn end already cut)
    without the space the model puts after "Assistant:"."""
    return text.lstrip()


class StopText:
    """Finds stop strings in text that arrives piece by piece.

    `add(piece)` returns `(text safe to send, stopped)`; text that might be
    the start of a stop string is held back until it is not. `flush()`
    returns what was held back when generation ends another way.
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def add(self, piece):
        self.text += piece
        if not self.stops:
            return self._send(len(self.text)), False
        # Only a stop that reaches into the new text can be new.
        start = max(0, self.sent - self.hold)
        found = [
            i for i in (self.text.find(s, start) for s in self.stops) if i >= 0
        ]
        if found:
            end = min(found)
            delta = self.text[self.sent : end] if end > self.sent else ""
            self.text = self.text[:end]
            self.sent = len(self.text)
            return delta, True
        return self._send(max(self.sent, len(self.text) - self.hold)), False

    def flush(self):
        return self._send(len(self.text))

    def _send(self, end):
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
