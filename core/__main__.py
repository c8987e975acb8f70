from __future__ import annotations

from shipyard._cli import main

if __name__ == "__main__":
    main(prog_name="shipyard")
