"""Word lists for the RULER-style tasks (needle keys, common-word lists, planted facts).

Written for this project and frozen here so samples never depend on outside files. Each list is
split into train/test by :func:`kvp_gym.data.common.split_of` at use time.
"""

ADJECTIVES: tuple[str, ...] = tuple(
    """
    able absent acidic active actual adorable afraid agile airy alert alive ancient angry
    anxious arctic arid awake aware awful bald bare basic beloved best better big bitter
    black bland blank bleak blind blond blue blunt bold bony boring bouncy brave brief bright
    brisk broad broken bronze brown bumpy busy calm candid careful casual cheap cheerful
    chilly chubby civil classic clean clear clever close cloudy clumsy coarse cold common
    cool cosy crafty crazy creamy crisp crooked cruel curly curved cute daily damp dark dear
    deep dense direct dirty distant dizzy dry dull dusty eager early earnest easy elastic
    elder empty endless equal even exact exotic faint fair faithful false famous fancy far
    fast fat fearless feeble fierce fine firm fixed flat fluffy fond formal fragile frail
    frank free fresh friendly frozen full funny fuzzy gentle giant gifted glad glossy golden
    good graceful grand gray greasy great green grim gritty grumpy handy happy hard harsh
    hasty healthy heavy helpful hidden high hollow honest huge humble hungry icy idle ill
    immense jolly juicy keen kind large late lazy lean light little lively lonely long loose
    loud loyal lucky mad major mellow merry mild misty modern modest moist narrow nasty neat
    nervous new nice nimble noble noisy normal odd old open orange pale perfect petite plain
    plump polite poor precise pretty proud pure purple quick quiet radiant rapid rare raw
    ready real rich rigid ripe rough round royal rude rusty sad safe salty sandy scarce
    secret severe shaggy shallow sharp shiny short shy silent silky silly simple sleepy slim
    slow small smart smooth snowy soft solid sour spare spicy spotted stable steady steep
    sticky stiff stormy strange strict strong sturdy subtle sudden sunny super sweet swift
    tall tame tender tense thick thin thirsty tidy tiny tired tough tricky true ugly upbeat
    urban useful vague vast violet vivid warm weak wealthy weary wet whole wicked wide wild
    windy wise witty wooden worn yellow young zany zealous
    """.split()
)

NOUNS: tuple[str, ...] = tuple(
    """
    acorn actor advice airport album alley anchor angle ankle answer apple apron arch arena
    arrow artist attic autumn avenue badge bakery balcony ballet balloon bamboo banana band
    banner barn barrel basket bath beach beacon bean bear beard bell belt bench berry bicycle
    bird biscuit blanket blossom boat bone book boot bottle boulder bowl box branch bread
    breeze brick bridge brook broom brush bubble bucket buffalo bugle bundle butter button
    cabin cable cactus cake camel camera camp canal candle canoe canvas canyon cape captain
    card carpet carrot castle cave cellar chair chalk chapel cheese cherry chess chimney
    church circle circus city cliff clock cloud clover coach coast coat coconut coffee coin
    comet compass cookie copper coral corner cottage cotton country cousin crater crayon
    creek cricket crown crystal cup curtain cushion daisy dancer desert desk diamond dinner
    doctor dolphin donkey door dragon drawer dream drum duck eagle earth echo engine envelope
    falcon farm feather fence fern festival field finger fire flag flame flute fog forest
    fork fountain fox frog fruit galaxy garage garden gate ghost giraffe glacier glove goat
    gold grape grass guitar hammer harbor harp hat hawk hedge helmet hill hive honey horizon
    horse hospital hotel island ivory jacket jungle kettle key kingdom kitchen kite ladder
    lake lamp lantern laser leaf lemon letter library lighthouse lily lion lizard lobster
    machine magnet mango map marble market meadow melon mirror monkey moon mountain muffin
    museum needle nest night noodle novel oak ocean office olive onion orchard otter owl
    paddle palace panda paper parade parrot pasta peach pearl pebble pencil penguin pepper
    piano pickle picnic pillow pilot pine pirate planet plate plum pocket poem pond potato
    prism pumpkin puzzle quarry queen quilt rabbit radio rain rainbow raven ribbon ring
    river road robot rocket roof rope rose sail salad sand saucer scarf school scissors
    sea seed shadow shark sheep shell ship shoe shovel silver singer sky sled snail snake
    soap sock sofa soup spider spoon spring square squirrel stable stage star station statue
    stone storm straw stream street sugar summer sun swan sweater table tail teacher temple
    tent theater thunder ticket tiger timber toast tomato tower town tractor train tree
    trumpet tunnel turtle umbrella valley vase velvet village violin volcano wagon wall
    walnut wand water wave whale wheel whistle willow window winter wizard wolf wool yacht
    zebra
    """.split()
)

VERBS: tuple[str, ...] = tuple(
    """
    accept admire advise agree allow amuse answer appear argue arrange arrive ask attach
    attend avoid bake balance bathe beg behave belong blink boil borrow bounce breathe build
    bury calculate carry carve celebrate chase cheer chew clap climb collect comb compare
    complain confess consider cook copy cough count crawl cross cry cycle dance decide
    deliver describe design destroy dig discover dive divide doubt drag draw dream dress
    drift drink drive drop dust earn educate embrace employ enjoy enter escape examine
    explain explore fasten fetch fill find fix float flow fly fold follow forgive frown
    gather gaze giggle glide glow grab greet grin grow guard guess guide hammer handle hang
    harvest hatch heal help hide hike hop hug hum hunt hurry imagine improve invent invite
    jog join juggle jump kick kneel knit knock laugh launch lead learn lend lift listen
    march marry measure melt mend milk mix mourn move nod notice obey offer open organise
    pack paddle paint park pause pedal peel perform pinch plant play plead point polish pour
    pray preach prepare print promise protect pull pump punch push question race rain reach
    read relax remember repair repeat reply rescue retire return rinse roar roll rub run
    rush sail scatter scold scrub search serve settle sew shave shiver shout sigh sing skate
    ski skip sleep slide smile sneeze sniff snore solve sparkle speak spell spill splash
    spray sprint squeeze stamp stare steer stir stitch stretch study succeed suggest
    swim swing talk taste teach tease thank throw tickle tiptoe trace trade train travel
    tremble trot trust tug tumble type unite unlock unpack vanish visit wade wait walk wander
    warn wash watch wave weave whisper whistle wink wish wobble wonder worry wrap wrestle
    write yawn yell zoom
    """.split()
)

FIRST_NAMES: tuple[str, ...] = tuple(
    """
    Aaron Ada Adele Aditya Ahmed Aiko Alan Alba Alice Amara Amir Ana Anders Andrea Anika
    Arjun Astrid Ayla Beatrix Benedict Bianca Boris Bruno Camille Carlos Cecilia Chiara
    Chloe Clara Conrad Dalia Daniel Dario Dmitri Edgar Elena Elif Elias Elodie Emil Emma
    Enzo Esther Ezra Fatima Felix Fiona Florian Freya Gabriel Greta Gustav Hana Hannah Hector
    Helga Hiro Hugo Ibrahim Ines Ingrid Irene Isaac Ivan Jada Jasper Javier Joanna Jonas
    Julia Kai Karim Katya Kenji Lara Leila Lena Leon Liam Lina Lorenzo Lucia Luka Magnus
    Maia Malik Marco Marta Mateo Mila Milo Mina Nadia Naomi Nico Nils Nina Noah Nora Oliver
    Olga Omar Oscar Paloma Pavel Petra Priya Quentin Rafael Ravi Rosa Ruben Ruth Sana Selma
    Sergei Silas Sofia Soren Stella Tariq Tessa Theo Tomas Uma Valentina Vera Victor Wanda
    Xavier Yara Yusuf Zara Zoe
    """.split()
)

QA_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "favourite colour": tuple(
        """amber azure beige burgundy cerulean charcoal coral crimson cyan emerald fuchsia
        indigo ivory jade khaki lavender lilac magenta maroon mauve mint mustard navy ochre
        olive peach periwinkle plum rust saffron salmon scarlet sepia tan taupe teal
        turquoise ultramarine vermilion""".split()
    ),
    "favourite fruit": tuple(
        """apricot avocado blackberry blueberry cantaloupe clementine cranberry currant date
        dragonfruit durian elderberry fig gooseberry grapefruit guava huckleberry jackfruit
        kiwi kumquat lime lychee mandarin mangosteen mulberry nectarine papaya passionfruit
        persimmon pineapple pomegranate quince raspberry rhubarb strawberry tangerine
        watermelon""".split()
    ),
    "home town": tuple(
        """Aberdeen Antwerp Asheville Bergen Bilbao Bologna Bordeaux Bremen Brno Cork Dijon
        Dresden Dundee Eindhoven Galway Genoa Ghent Gothenburg Graz Groningen Hobart Innsbruck
        Kyoto Leeds Leipzig Lille Linz Lyon Malmo Marseille Nantes Odense Porto Salzburg
        Seville Split Tampere Toulouse Trieste Turin Uppsala Utrecht Valencia Verona Zagreb
        Zurich""".split()
    ),
    "profession": tuple(
        """accountant architect astronomer baker barber beekeeper blacksmith botanist
        carpenter cartographer chemist chef dentist economist electrician engineer farmer
        firefighter florist geologist glassblower goldsmith historian illustrator jeweller
        journalist lawyer librarian locksmith mechanic midwife miner nurse optician painter
        pharmacist photographer physicist pilot plumber potter sailor sculptor surgeon
        tailor translator veterinarian weaver zoologist""".split()
    ),
    "favourite animal": tuple(
        """aardvark alpaca armadillo badger beaver bison chameleon cheetah chinchilla
        chipmunk cougar coyote crocodile ferret flamingo gazelle gecko hedgehog hippopotamus
        hyena iguana jaguar kangaroo koala lemur leopard llama lynx meerkat mongoose moose
        narwhal ocelot orangutan pangolin platypus porcupine puffin raccoon reindeer
        rhinoceros salamander sloth stingray tapir toucan walrus wombat""".split()
    ),
    "favourite instrument": tuple(
        """accordion bagpipes banjo bassoon cello clarinet cornet didgeridoo dulcimer
        euphonium glockenspiel harmonica harpsichord kalimba lute mandolin marimba oboe
        ocarina organ piccolo saxophone sitar tambourine theremin trombone tuba ukulele
        vibraphone viola xylophone zither""".split()
    ),
    "favourite sport": tuple(
        """archery badminton baseball basketball biathlon bobsleigh bowling boxing canoeing
        cricket croquet curling cycling diving fencing football golf gymnastics handball
        hockey judo karate lacrosse netball polo rowing rugby sailing skiing snooker
        softball squash surfing swimming tennis triathlon volleyball wrestling""".split()
    ),
    "favourite flower": tuple(
        """anemone azalea begonia bluebell buttercup camellia carnation chrysanthemum
        cornflower crocus cyclamen dahlia delphinium foxglove freesia gardenia geranium
        gladiolus hibiscus hyacinth hydrangea iris jasmine lavender lilac lotus magnolia
        marigold narcissus orchid pansy peony petunia poppy primrose snapdragon sunflower
        tulip verbena violet wisteria zinnia""".split()
    ),
}
