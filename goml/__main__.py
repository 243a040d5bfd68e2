from goml.cli import main

main()
