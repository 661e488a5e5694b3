import sys

try:
    from legofx.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported
    print("legofx: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
