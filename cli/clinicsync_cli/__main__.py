from clinicsync_cli.app import app


def main() -> None:
    """The installed `clinicsync` command (pyproject's [project.scripts])."""
    app(prog_name="clinicsync")


if __name__ == "__main__":
    main()
