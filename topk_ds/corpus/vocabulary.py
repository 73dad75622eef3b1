"""Topics of the synthetic corpus: 20 nouns, 12 verbs and 10 adjectives each (42 lemmas), no word
shared between topics. An irregular plural is written "singular:plural"."""

TOPICS = {
    "work": {
        "nouns": "office manager worker meeting salary project deadline report contract employee company "
                 "desk career boss colleague shift task client budget promotion",
        "verbs": "hire manage pay schedule sign review submit finish assign negotiate promote email",
        "adjectives": "busy professional urgent productive corporate annual efficient senior weekly salaried",
    },
    "numbers": {
        "nouns": "number digit sum fraction equation ratio formula total average angle graph integer "
                 "remainder multiple factor square triangle calculator proof theorem",
        "verbs": "add subtract multiply divide count calculate solve round estimate double compute tally",
        "adjectives": "even odd prime negative positive exact equal numeric whole infinite",
    },
    "history": {
        "nouns": "king queen empire war battle castle treaty kingdom century dynasty revolution army "
                 "emperor monument ruin knight colony throne chronicle soldier",
        "verbs": "conquer rule invade defeat crown found defend overthrow unite occupy besiege betray",
        "adjectives": "ancient medieval royal imperial noble historic colonial feudal victorious legendary",
    },
    "science": {
        "nouns": "scientist experiment atom molecule cell laboratory theory microscope energy particle gene "
                 "hypothesis:hypotheses sample reaction electron telescope protein chemical crystal magnet",
        "verbs": "observe test analyze examine heat isolate predict discover publish replicate dissolve detect",
        "adjectives": "scientific molecular atomic organic magnetic experimental genetic microscopic electric theoretical",
    },
    "food": {
        "nouns": "chef soup bread kitchen recipe cheese apple salad onion butter pepper sauce oven noodle "
                 "potato:potatoes tomato:tomatoes dessert spoon meal flavor",
        "verbs": "cook bake slice boil fry taste season chop roast stir serve peel",
        "adjectives": "delicious spicy fresh sweet salty crispy tender savory ripe creamy",
    },
    "sport": {
        "nouns": "player team coach match goal ball stadium referee league trophy tournament athlete score "
                 "racket fan medal striker helmet whistle champion",
        "verbs": "kick throw catch tackle pass dribble train block sprint cheer win lose",
        "adjectives": "athletic fast competitive olympic defensive sporty undefeated rival fit agile",
    },
    "weather": {
        "nouns": "rain storm cloud wind snow thunder lightning forecast temperature sky fog hail breeze "
                 "drought flood sunshine umbrella raincoat hurricane climate",
        "verbs": "pour freeze melt blow soak drizzle chill shine darken brighten dampen thaw",
        "adjectives": "rainy stormy cloudy windy snowy foggy humid chilly sunny freezing",
    },
    "music": {
        "nouns": "song guitar piano drum melody concert singer band violin rhythm chord orchestra album "
                 "lyric note choir trumpet composer harmony tune",
        "verbs": "sing play strum compose perform rehearse hum conduct improvise harmonize applaud accompany",
        "adjectives": "musical melodic loud acoustic rhythmic harmonic classical catchy lyrical operatic",
    },
    "travel": {
        "nouns": "passport airport ticket hotel suitcase journey tourist map flight beach island guide visa "
                 "cruise harbor border station backpack souvenir postcard",
        "verbs": "visit explore pack book tour fly board cross reach photograph rent unpack",
        "adjectives": "foreign exotic scenic coastal remote international tropical adventurous luxurious crowded",
    },
    "animals": {
        "nouns": "dog cat horse rabbit fox wolf:wolves bird lion tiger elephant monkey bear owl snake frog "
                 "mouse:mice puppy kitten eagle zebra",
        "verbs": "chase hunt feed groom tame herd bite sniff pet scratch stalk nuzzle",
        "adjectives": "wild furry fierce playful loyal feathered scaly nocturnal hungry shaggy",
    },
}

NUMBER_WORDS = "two three four five six seven eight nine ten eleven twelve twenty fifty".split()
TIME_WORDS = "day morning evening week month year".split()
SINGULAR_PRONOUNS = ("she", "he")
PLURAL_PRONOUNS = ("they", "we")
PREPOSITIONS = "near behind beside under above inside".split()
CONNECTIVES = ("because", "while", "although", "and then", "so")
