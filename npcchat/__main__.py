from npcchat.cli import main

main()
