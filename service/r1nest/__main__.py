from r1nest.cli import main

main()
