"""The argument parser of every command line here: a bad flag is one line, like every other
input error, instead of argparse's usage block."""
import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, with `error: MESSAGE (see PROG --help)` and exit status 2 on bad flags."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.help_command()})\n")

    def help_command(self):
        # Subcommand parsers are named "PROG SUB"; the top-level help lists them all.
        prog = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        return f"{prog} --help"
